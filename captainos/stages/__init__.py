"""The build stages (kernel -> tools -> initramfs -> iso) and what they write: the cpio,
segments, SBOM, OCI layouts, out/. Imports the core and the sources, never the lab."""
