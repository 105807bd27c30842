#!/bin/sh
# check-kernel-config: does the running kernel have every option CaptainOS needs?
#
# Usage: check-kernel-config [REQUIRED_LIST]
#   REQUIRED_LIST  lines "CONFIG_NAME [module]" ('#' starts a comment); default
#                  /usr/lib/captainos/kernel-required.txt (kernel/required.txt of the repo).
# An option passes when it is =y, or =m when the named module is available (in modules.dep
# or modules.builtin of MODULES_DIR).
# Overridable inputs, so that the same script runs in a host test against fixture files:
#   KERNEL_CONFIG  the kernel's config, plain or gzip; default /proc/config.gz, else
#                  /usr/lib/modules/<release>/config, else /boot/config-<release>
#   MODULES_DIR    default /usr/lib/modules/<release>
#   KERNEL_RELEASE default $(uname -r)
# Exit status: 0 all present (one line on stdout), 1 some missing (one line each on
# stderr), 2 bad usage or unreadable input.
#
# POSIX sh has no pipefail: no pipeline below has a failing stage that matters; every
# command whose failure matters runs on its own so that `set -e` sees it.
set -eu

required=${1:-/usr/lib/captainos/kernel-required.txt}
release=${KERNEL_RELEASE:-$(uname -r)}
modules_dir=${MODULES_DIR:-/usr/lib/modules/$release}

die() {
    echo "check-kernel-config: $*" >&2
    exit 2
}

# The first config source that exists wins.
config_src=${KERNEL_CONFIG:-}
if [ -z "$config_src" ]; then
    for candidate in /proc/config.gz "$modules_dir/config" "/boot/config-$release"; do
        if [ -r "$candidate" ]; then
            config_src=$candidate
            break
        fi
    done
fi
[ -n "$config_src" ] || die "no kernel config found (/proc/config.gz needs CONFIG_IKCONFIG_PROC)"
[ -r "$config_src" ] || die "cannot read kernel config $config_src"
[ -r "$required" ] || die "cannot read the list of required options $required"

tmp=$(mktemp -d)
# Remove the scratch directory however the script ends.
trap 'rm -rf "$tmp"' EXIT

# Plain text config in $tmp/config, whether the source is gzip-compressed or not.
case $config_src in
    *.gz) gzip -dc "$config_src" >"$tmp/config" || die "cannot decompress $config_src" ;;
    *) cp "$config_src" "$tmp/config" ;;
esac

# Names of available modules, one a line, dashes folded to underscores (modprobe treats
# them alike): path up to ':' in modules.dep, whole lines of modules.builtin.
: >"$tmp/modules"
for index in "$modules_dir/modules.dep" "$modules_dir/modules.builtin"; do
    if [ -r "$index" ]; then
        sed -e 's/:.*//' -e 's#.*/##' -e 's/\.ko.*//' "$index" | tr '-' '_' >>"$tmp/modules"
    fi
done

checked=0
missing=0
while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    # Word-split the line on purpose: "CONFIG_NAME [module]".
    # shellcheck disable=SC2086
    set -- $line
    [ $# -gt 0 ] || continue
    option=$1
    module=${2:-}
    case $option in
        CONFIG_*) ;;
        *) die "$required: expected 'CONFIG_NAME [module]', got '$line'" ;;
    esac
    checked=$((checked + 1))
    value=$(sed -n "s/^$option=//p" "$tmp/config")
    if [ "$value" = y ]; then
        continue
    fi
    if [ "$value" = m ] && [ -n "$module" ] &&
        grep -qx "$(printf '%s' "$module" | tr '-' '_')" "$tmp/modules"; then
        continue
    fi
    if [ "$value" = m ]; then
        echo "missing: $option (=m but module ${module:-?} is not available)" >&2
    else
        echo "missing: $option (not set)" >&2
    fi
    missing=$((missing + 1))
done <"$required"

if [ "$missing" -gt 0 ]; then
    echo "check-kernel-config: $missing of $checked required options missing in $config_src" >&2
    exit 1
fi
echo "check-kernel-config: all $checked required options present ($config_src)"
