from captainos import summary


def test_tools_are_shown_with_source_origin_and_digests():
    components = {
        "runc": {"name": "runc", "version": "1.4.0", "source": "go", "module": "github.com/opencontainers/runc@v1.4.0",
                 "binaries": {"runc": {"sha256": "ab" * 32, "size": 13307384}}},
        "nerdctl": {"name": "nerdctl", "version": "2.2.1", "source": "release",
                    "url": "https://mirror.example/nerdctl-2.2.1-linux-amd64.tar.gz",
                    "binaries": {"nerdctl": {"sha256": "cd" * 32, "size": 1}}},
    }
    assert summary.tool_lines(components) == [
        "runc 1.4.0 from go github.com/opencontainers/runc@v1.4.0",
        f"  runc                     {'ab' * 32}  13307384 bytes",
        "nerdctl 2.2.1 from release https://mirror.example/nerdctl-2.2.1-linux-amd64.tar.gz",
        f"  nerdctl                  {'cd' * 32}  1 bytes",
    ]
