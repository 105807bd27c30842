"""Every pinned external input in one table: versions, URLs and sha256 digests.

Bumping a version is a one-line change here plus its new digest; cache keys include these
entries, so a bump rebuilds exactly what depends on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_RELEASE = "trixie"
# The newest modification time any file in the initramfs may carry (2026-01-01 00:00 UTC):
# mkosi clamps newer files to it (--source-date-epoch) and the tools segment uses it, so two
# builds from the same inputs give the same bytes. Move it forward with a release.
SOURCE_DATE_EPOCH = 1767225600


@dataclass(frozen=True)
class DebPin:
    """A Debian package file fetched outside apt (verified by sha256 before use)."""

    name: str
    version: str
    filename: str  # path under the mirror root
    sha256: str


# mkosi is not on PyPI; Debian trixie's package is pure Python and runs from an unpacked tree.
MKOSI = DebPin(
    name="mkosi",
    version="25.3-7",
    filename="pool/main/m/mkosi/mkosi_25.3-7_all.deb",
    sha256="ef56c81324fd47d65490e944ec4697bb3f6fb21326d0d071bfc2fb5ba5383252",
)


# --- the Go toolchain (host.install_go; what the go builds need) --------------------------
@dataclass(frozen=True)
class GoToolchainPin:
    """Go's own toolchain module (golang.org/toolchain), as the Go module proxy serves it.

    The sha256 is that of the module zip that `go mod download` verified against the Go
    checksum database (h1:ZOmGe1On... for linux-amd64)."""

    version: str
    minimum: str  # the newest `go` directive among the pinned modules (tinkerbell, containerd)
    sha256: Mapping[str, str]  # per arch

    def module_version(self, arch: str) -> str:
        return f"v0.0.1-go{self.version}.linux-{arch}"

    def zip_url(self, proxy: str, arch: str) -> str:
        return f"{proxy.rstrip('/')}/golang.org/toolchain/@v/{self.module_version(arch)}.zip"


GO_TOOLCHAIN = GoToolchainPin(
    version="1.26.8",
    minimum="1.26.3",
    sha256={"amd64": "30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7",
            "arm64": "02b36b6787b3ac767668f630e2998df45a3b1f9ffee08d1bf3ef6487cd658d99"},
)
GO_PROXY = "https://proxy.golang.org"
# The checksum database every module of our Go builds is checked against (GOSUMDB): set for
# each go command, never taken from the host, so GONOSUMDB/GOPRIVATE/GOFLAGS there cannot
# turn the check off.
GO_SUMDB = "sum.golang.org"


# --- tink-agent (agent.py, e2e harness) --------------------------------------------------
@dataclass(frozen=True)
class GoModulePin:
    """A Go module at a version, verified against the go.sum hash (h1:) the proxy serves."""

    path: str
    version: str
    h1: str

    @property
    def query(self) -> str:
        return f"{self.path}@{self.version}"


# The agent is `./cmd/agent` of the root module; its go.mod replaces the api module with a
# directory that is not in the root module's zip, so both are downloaded and joined.
TINK_AGENT = GoModulePin("github.com/tinkerbell/tinkerbell", "v0.25.0",
                         "h1:U7blKIMZCjzoDesaA2615Xivoby6MFdDMoL7Sk+27so=")
TINK_AGENT_API = GoModulePin("github.com/tinkerbell/tinkerbell/api", "v0.25.0",
                             "h1:pm3aHDcGHI8QYxw1CnJZ7bRx5QesqBhfMVeMJR/wjnY=")
TINK_AGENT_PACKAGE = "./cmd/agent"
# The real Tinkerbell of the lab: `./cmd/tinkerbell` of the same module, with etcd and
# kube-apiserver embedded. Its go.mod requires quamina.net/go/quamina, which the module proxy
# does not serve; the same library is served under its former path, and that module's go.mod
# already declares `module quamina.net/go/quamina`, so it stands in through a replace.
TINKERBELL_PACKAGE = "./cmd/tinkerbell"
TINKERBELL_TAGS = ("embedded",)
QUAMINA_PATH = "quamina.net/go/quamina"
QUAMINA = GoModulePin("github.com/timbray/quamina", "v1.4.0", "h1:nU2v0Y+mhoL/nyF0XBqnluq6Hf9fuOaWxfj0+Y2xnc8=")
# Helm, built from the module proxy for the lab's file server: `helm template` of the chart in
# the tinkerbell module (helm/tinkerbell) renders the nginx configuration the chart deploys.
HELM = GoModulePin("helm.sh/helm/v4", "v4.3.2", "h1:zdd8DgKTlLrlYIzdoAntDHLH0V3RkgNIpQ3yjzuD84M=")
HELM_PACKAGE = "./cmd/helm"

# Tinkerbell's hub actions (github.com/tinkerbell/actions): the module proxy does not serve
# this repository, so the lab builds them from a git repository holding this commit (the
# commit names the tree; go.sum, checked against its sha256 here, names every dependency,
# each of which the proxy serves and the checksum database vouches for).
@dataclass(frozen=True)
class SourcePin:
    repository: str
    commit: str
    go_sum_sha256: str
    programs: tuple[str, ...]


HUB_ACTIONS = SourcePin("github.com/tinkerbell/actions", "ae3e51dfb3c1dd54c143e6d2fe48c248ae86e78d",
                        "306a177bef54fca9f9006b04af9aeb1f8ef5a55f1736ae97f5b11cd087f93349",
                        ("image2disk", "oci2disk", "writefile", "cexec", "kexec"))

# sigstore's cosign v2, which signs what `publish` pushes (key-based, offline): `go install`
# works for it, every module checked against the checksum database.
COSIGN = GoModulePin("github.com/sigstore/cosign/v2", "v2.6.5", "h1:D7kFSWS2HzfD+LpEuBO89D1KfOAODlkWuuhzXS8yzi0=")
COSIGN_PACKAGE = "github.com/sigstore/cosign/v2/cmd/cosign"


# --- TOOLS: the container stack actions run with (tools.py) --------------------------------
# Release digests are the sha256 of the upstream release files as listed by Kubespray
# (kubernetes-sigs/kubespray, roles/kubespray_defaults/vars/main/checksums.yml at
# 005bdce7f1867958838a2d0bb4f7e67893d98f64: containerd_archive_checksums, nerdctl_archive_checksums,
# cni_binary_checksums; runc_checksums 1.4.0 from 11a985dcd37c4c78b08664e9161cc7b180fe8121, the same
# two digests upstream's clearsigned runc.sha256sum of v1.4.0 lists). Every release file is checked
# against a digest from this table: a list served next to the file, by the same host or mirror,
# would prove nothing. A component without a digest here is built from its Go module.
# Module hashes (h1:) are the go.sum hashes of the module zips, as sum.golang.org serves them.
TOOLS_RELEASE_HOST = "https://github.com"  # replaced by --tools-mirror / TOOLS_MIRROR


@dataclass(frozen=True)
class GoBuild:
    """One binary of a component built from its Go module: `go build <flags> -o <binary> <package>`."""

    binary: str
    package: str
    tags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()  # after "-s -w"; {version} and {revision} are filled in
    flags: tuple[str, ...] = ()  # extra `go build` flags
    cgo: bool = False  # links libseccomp statically (runc); everything else is CGO_ENABLED=0


@dataclass(frozen=True)
class ToolPin:
    """A component of the container stack: where its release comes from and how to build it."""

    name: str
    version: str  # without the leading v
    release: str  # path of the release file under the release host; {version} and {arch} are filled in
    archive: bool  # the release file is a tar archive (else it is the binary itself)
    sha256: Mapping[str, str | None]  # release file digest per arch; None: not pinned, built from Go
    module_path: str
    module_h1: str  # go.sum hash of the module zip at v<version>
    dest: str  # directory of the binaries in the image tree
    builds: tuple[GoBuild, ...]
    # Test-only parts that upstream links in but the module zip cannot build: files removed from
    # the source copy, and module requirements (path@version) dropped with their replace.
    exclude_files: tuple[str, ...] = ()
    drop_requires: tuple[str, ...] = ()
    version_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # default: --version

    @property
    def module(self) -> GoModulePin:
        return GoModulePin(self.module_path, f"v{self.version}", self.module_h1)

    @property
    def binaries(self) -> tuple[str, ...]:
        return tuple(b.binary for b in self.builds)

    def release_path(self, arch: str) -> str:
        return self.release.format(version=self.version, arch=arch)


_CONTAINERD_X = "-X github.com/containerd/containerd/v2/version"
_CNI_X = "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=v{version}"
_CNI_PLUGINS = {"bridge": "main", "host-local": "ipam", "loopback": "main",
                "portmap": "meta", "firewall": "meta", "tuning": "meta"}

TOOLS: tuple[ToolPin, ...] = (
    ToolPin(
        name="containerd",
        version="2.2.1",
        release="containerd/containerd/releases/download/v{version}/containerd-{version}-linux-{arch}.tar.gz",
        archive=True,
        sha256={"amd64": "f5d8e90ecb6c1c7e33ecddf8cc268a93b9e5b54e0e850320d765511d76624f41",
                "arm64": "dac15a0d412a24be8bfe6a40cec8f51829062725169f1e72ac7d120a891ef5b6"},
        module_path="github.com/containerd/containerd/v2",
        module_h1="h1:TpyxcY4AL5A+07dxETevunVS5zxqzuq7ZqJXknM11yk=",
        dest="usr/bin",
        # Tags and -X flags of the module's Makefile (GO_BUILDTAGS, SHIM_GO_BUILDTAGS, GO_LDFLAGS),
        # plus no_cri for the daemon: the Kubernetes CRI plugins are off in the image's
        # config.toml, so their code (a third of the binary) never runs in CaptainOS.
        builds=tuple(
            GoBuild(binary, f"./cmd/{binary}", tags=tags,
                    ldflags=(f"{_CONTAINERD_X}.Version=v{{version}}", f"{_CONTAINERD_X}.Revision={{revision}}",
                             f"{_CONTAINERD_X}.Package=github.com/containerd/containerd/v2"))
            for binary, tags in (("containerd", ("urfave_cli_no_docs", "no_cri")), ("ctr", ("urfave_cli_no_docs",)),
                                 ("containerd-shim-runc-v2", ("urfave_cli_no_docs", "no_grpc")))),
        version_args={"containerd-shim-runc-v2": ("-v",)},
    ),
    ToolPin(
        name="runc",
        version="1.4.0",
        release="opencontainers/runc/releases/download/v{version}/runc.{arch}",
        archive=False,
        sha256={"amd64": "c5d4995c5aec204d7e1827d9d9a6b45042602736f7f415f484252e576dcdac28",
                "arm64": "2adbeed4c751d6f2201c642ed06269ff4370fcc4165abd3f323e19c653716c31"},
        module_path="github.com/opencontainers/runc",
        module_h1="h1:FG1Hw0GBYPsNki+mBz1QOrSzbwbAcerhrAD2r097QCc=",
        dest="usr/bin",
        # `make static` of the module's Makefile: static PIE with libseccomp; the version comes
        # from the module's VERSION file (go:embed). An empty build ID keeps the binary
        # identical wherever libseccomp was unpacked (its path is part of the cgo action ID).
        builds=(GoBuild("runc", ".", tags=("seccomp", "urfave_cli_no_docs", "netgo", "osusergo"),
                        ldflags=("-X main.gitCommit={revision}", "-linkmode external", "-extldflags -static-pie",
                                 "-buildid="),
                        flags=("-buildmode=pie",), cgo=True),),
    ),
    ToolPin(
        name="nerdctl",
        version="2.2.1",
        release="containerd/nerdctl/releases/download/v{version}/nerdctl-{version}-linux-{arch}.tar.gz",
        archive=True,
        sha256={"amd64": "34144de7f12756aa4b9dc42a907fd95b0c5eb82a63566a650ca10c8abe7a26a0",
                "arm64": "abc83c9ac3d843c3442eedfb61c6456b8b59b1e4cd69f69598ca1582acc7c094"},
        module_path="github.com/containerd/nerdctl/v2",
        module_h1="h1:eXBu4HddMEXtLmZsJncfvOiJ6a8DemOzWhOxypNIEG0=",
        dest="usr/bin",
        builds=(GoBuild("nerdctl", "./cmd/nerdctl",
                        ldflags=("-X github.com/containerd/nerdctl/v2/pkg/version.Version=v{version}",
                                 "-X github.com/containerd/nerdctl/v2/pkg/version.Revision={revision}")),),
        # helpers/testing_linux.go (test helpers, used by _test files only) imports the nested
        # module mod/tigron, which go.mod replaces with ./mod/tigron: module zips leave nested
        # modules out and the proxy does not serve it, so the file and the requirement go.
        exclude_files=("cmd/nerdctl/helpers/testing_linux.go",),
        drop_requires=("github.com/containerd/nerdctl/mod/tigron@v0.0.0",),
    ),
    ToolPin(
        name="cni-plugins",
        version="1.6.0",
        release="containernetworking/plugins/releases/download/v{version}/cni-plugins-linux-{arch}-v{version}.tgz",
        archive=True,
        sha256={"amd64": "682b49ff8933a997a52107161f1745f8312364b4c7f605ccdf7a77499130d89d",
                "arm64": "db09ab057ecf60b05ba05cbec38d55b95cc139c7f1078e2e4857cc13af158cee"},
        module_path="github.com/containernetworking/plugins",
        module_h1="h1:lrsUrLF7QODLx6gncHOqk/pnCiC7c6bvDAskV4KUifQ=",
        dest="opt/cni/bin",
        builds=tuple(GoBuild(plugin, f"./plugins/{kind}/{plugin}", ldflags=(_CNI_X,))
                     for plugin, kind in _CNI_PLUGINS.items()),
        # A plugin prints "CNI <name> plugin v<version>" when run without CNI_COMMAND.
        version_args={plugin: () for plugin in _CNI_PLUGINS},
    ),
)

# runc links libseccomp statically; Debian 12's static library suits both a bookworm host and
# newer ones (an older glibc ABI links against a newer libc, not the other way round).
LIBSECCOMP: Mapping[str, DebPin] = {
    "amd64": DebPin("libseccomp-dev", "2.5.4-1+deb12u1",
                    "pool/main/libs/libseccomp/libseccomp-dev_2.5.4-1+deb12u1_amd64.deb",
                    "5fb305f3aeb293e2b78a4cfcb58c0f42179703c371a408d002c8454661e6b7b2"),
    "arm64": DebPin("libseccomp-dev", "2.5.4-1+deb12u1",
                    "pool/main/libs/libseccomp/libseccomp-dev_2.5.4-1+deb12u1_arm64.deb",
                    "4e740b9dd4fb3528aef2a493fd96589cb2b89ca74151f8844584d214b9c8b731"),
}


# Smee's ISO patcher looks for this exact 1024-character string in the ISO (its default
# `isoMagicString`, the HookOS convention) and overwrites it in place with the per-machine
# kernel parameters, padded with spaces, so the file size never changes.
ISO_MAGIC = (
    "464vn90e7rbj08xbwdjejmdf4it17c5zfzjyfhthbh19eij201hjgit021bmpdb9ctrc87x2ymc8e7icu4ffi15x1hah9iyaiz38ckyap8hwx2"
    "vt5rm44ixv4hau8iw718q5yd019um5dt2xpqqa2rjtdypzr5v1gun8un110hhwp8cex7pqrh2ivh0ynpm4zkkwc8wcn367zyethzy7q8hzudyey"
    "zx3cgmxqbkh825gcak7kxzjbgjajwizryv7ec1xm2h0hh7pz29qmvtgfjj1vphpgq1zcbiiehv52wrjy9yq473d9t1rvryy6929nk435hfx55du"
    "3ih05kn5tju3vijreru1p6knc988d4gfdz28eragvryq5x8aibe5trxd0t6t7jwxkde34v6pj1khmp50k6qqj3nzgcfzabtgqkmeqhdedbvwf3b"
    "yfdma4nkv3rcxugaj2d0ru30pa2fqadjqrtjnv8bu52xzxv7irbhyvygygxu1nt5z4fh9w1vwbdcmagep26d298zknykf2e88kumt59ab7nq79d"
    "8amnhhvbexgh48e8qc61vq2e9qkihzt1twk1ijfgw70nwizai15iqyted2dt9gfmf2gg7amzufre79hwqkddc1cd935ywacnkrnak6r7xzcz7zb"
    "mq3kt04u2hg1iuupid8rt4nyrju51e6uejb2ruu36g9aibmz3hnmvazptu8x5tyxk820g2cdpxjdij766bt2n3djur7v623a2v44juyfgz80ekg"
    "fb9hkibpxh3zgknw8a34t4jifhf116x15cei9hwch0fye3xyq0acuym8uhitu5evc4rag3ui0fny3qg4kju7zkfyy8hwh537urd5uixkzwu5bdv"
    "afz4jmv7imypj543xg5em8jk8cgk7c4504xdd5e4e71ihaumt6u5u2t1w7um92fepzae8p0vq93wdrd1756npu1pziiur1payc7kmdwyxg3hj5n"
    "4phxbc29x0tcddamjrwt260b0w"
)
ISO_MAGIC_SHA256 = "252feaf619f32ca02d967c78c9fa1434c4c70c7774bf038e1de2fafbc5e88a78"


# --- KERNEL (owned by the kernel's source selection, captainos/sources/kernel.py) -----------
KERNEL_ORG_MIRROR = "https://cdn.kernel.org/pub/linux/kernel"
# sha256 of linux-<version>.tar.xz, as kernel.org's v6.x/sha256sums.asc lists it (6.12.69:
# copied from Buildroot's linux/before-6.17/linux.hash at 48186093fd355ede91151b2342e222cef303a6ca,
# "From https://www.kernel.org/pub/linux/kernel/v6.x/sha256sums.asc"). A version missing here
# is checked against that published list (fetched over HTTPS) instead, and the log says so.
KERNEL_ORG_SHA256: dict[str, str] = {
    "6.12.69": "4b493657f218703239c4f22415f027b3644949bf2761abd18b849f0aad5f7665",
}
