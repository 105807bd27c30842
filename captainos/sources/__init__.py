"""Where inputs come from: verified downloads, the Debian archive, the Go toolchain and module
proxy. Imports only the core."""
