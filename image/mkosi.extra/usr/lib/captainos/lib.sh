# shellcheck shell=bash
# Shared by every CaptainOS program: one-line JSON logging and kernel command line parsing.
#
# Source it after `set -euo pipefail`. Inputs are overridable so that the programs run on a
# build host against a temporary root:
#   CMDLINE_FILE  where the kernel command line is read when there is no boot parse (below)
#                 (default /proc/cmdline)
#   ROOT          prefix for every file a program reads or writes (default: the real root)
#   CAP_CMDLINE_PARSED  the boot's parse of the command line, written once by the generator
#                 captainos-cmdline (default $ROOT/run/captainos/cmdline.parsed)
#   CAP_PROGRAM   the "prog" field of log lines (default: the script's file name)
#   CAP_LOG_PREFIX  written before each log line (the generator's kernel log record header)

# Values from the command line and DHCP are split on "," "." ":" in loops; with globbing on,
# a value like "[b]in" or "*" would be matched against the working directory ("/" under
# systemd). No program here expands a glob on purpose, so globbing is off everywhere.
set -o noglob

CMDLINE_FILE=${CMDLINE_FILE:-/proc/cmdline}
ROOT=${ROOT:-}
CAP_CMDLINE_PARSED=${CAP_CMDLINE_PARSED:-$ROOT/run/captainos/cmdline.parsed}
CAP_PROGRAM=${CAP_PROGRAM:-${0##*/}}

# Parameters of the kernel command line, name -> value ("" for a bare word like "quiet"),
# and name -> the word as written, quotes included.
declare -gA CAP_PARAMS=()
declare -gA CAP_RAW=()
declare -ga CAP_CONSOLES=()

# cap_json_escape VAR TEXT: set VAR to TEXT as the inside of a JSON string: escape backslash
# and quote, encode the usual control characters, and replace any other control character by
# "?". (Into a variable, not printed: a command substitution per field would fork a shell for
# every log line's every field, which costs under emulation.)
cap_json_escape() {
    local _cap_text=$2 LC_ALL=C  # bytes, whatever the locale
    _cap_text=${_cap_text//\\/\\\\}
    _cap_text=${_cap_text//\"/\\\"}
    _cap_text=${_cap_text//$'\n'/\\n}
    _cap_text=${_cap_text//$'\r'/\\r}
    _cap_text=${_cap_text//$'\t'/\\t}
    _cap_text=${_cap_text//[[:cntrl:]]/?}
    # Bytes that are not UTF-8 make the line no JSON at all: then every byte above 0x7f is "?"
    # (the check costs nothing for plain ASCII, which is nearly every line).
    if [[ $_cap_text == *[$'\x80'-$'\xff']* && ! $_cap_text =~ $_CAP_UTF8_RE ]]; then
        _cap_text=${_cap_text//[$'\x80'-$'\xff']/?}
    fi
    printf -v "$1" '%s' "$_cap_text"
}
# Well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates), byte by byte.
_CAP_UTF8_RE=$'^([\x01-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf][\x80-\xbf]'
_CAP_UTF8_RE+=$'|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf][\x80-\xbf]|[\xf1-\xf3][\x80-\xbf][\x80-\xbf][\x80-\xbf]'
_CAP_UTF8_RE+=$'|\xf4[\x80-\x8f][\x80-\xbf][\x80-\xbf])*$'

# cap_log LEVEL MESSAGE [KEY=VALUE...]: one JSON object on one line, on stderr (the journal
# under systemd). Never pass a credential here: callers log parameter names, not values.
cap_log() {
    local level=$1 msg=$2 pair line key value
    shift 2
    cap_json_escape key "$CAP_PROGRAM"
    cap_json_escape value "$msg"
    line="{\"level\":\"$level\",\"prog\":\"$key\",\"msg\":\"$value\""
    for pair in "$@"; do
        # Split each extra field on its first "=" like the command line itself.
        cap_json_escape key "${pair%%=*}"
        cap_json_escape value "${pair#*=}"
        line+=",\"$key\":\"$value\""
    done
    printf '%s%s}\n' "${CAP_LOG_PREFIX-}" "$line" >&2
}
# cap_console MESSAGE: one plain line on the system console, for the operator watching the
# machine (the journal has the details). CAP_CONSOLE overrides the device in tests.
cap_console() {
    local console=${CAP_CONSOLE:-/dev/console}
    # A console that cannot be opened (none attached) must not fail the program.
    { printf 'captainos: %s: %s\n' "$CAP_PROGRAM" "$1" >>"$console"; } 2>/dev/null || return 0
}
cap_info() { cap_log info "$@"; }
cap_warn() { cap_log warning "$@"; }
cap_error() { cap_log error "$@"; }

# Load the command line into CAP_PARAMS, CAP_RAW and CAP_CONSOLES: from the boot's parse
# when the generator wrote one (the command line does not change while the system runs), else
# by parsing CMDLINE_FILE.
cap_cmdline_load() {
    # shellcheck source=/dev/null
    if [[ -f $CAP_CMDLINE_PARSED && -r $CAP_CMDLINE_PARSED ]] && . "$CAP_CMDLINE_PARSED"; then
        return 0
    fi
    cap_cmdline_parse
}

# The parameter table (params.tsv beside this file): every parameter's kind (the check the
# parse applies) and whether it is secret. Secret parameters never go into the saved parse:
# they stay only in the kernel's own command line; the one program that needs them parses it
# again (cap_secrets_load).
CAP_PARAMS_TABLE=${CAP_PARAMS_TABLE:-${BASH_SOURCE[0]%/*}/params.tsv}
declare -gA CAP_KIND=()
declare -ga CAP_SECRET_PARAMS=()
# Parameters the parse refused, name -> why (never the value): a program tells "absent" from
# "refused" with cap_refused, where a refused value must not fall back to a default.
declare -gA CAP_INVALID=()

# cap_table_load: fill CAP_KIND and CAP_SECRET_PARAMS from CAP_PARAMS_TABLE (once).
cap_table_load() {
    local name kind secret _
    ((${#CAP_KIND[@]} == 0)) || return 0
    while IFS=$'\t' read -r name _ kind secret _; do
        [[ -n $name && $name != '#'* ]] || continue
        CAP_KIND["$name"]=$kind
        [[ $secret != yes ]] || CAP_SECRET_PARAMS+=("$name")
    done <"$CAP_PARAMS_TABLE"
}

# cap_cmdline_save: parse CMDLINE_FILE and write the result, without CAP_SECRET_PARAMS, to
# CAP_CMDLINE_PARSED (root-only, as global array declarations).
cap_cmdline_save() {
    local name
    cap_cmdline_parse || return 1
    cap_table_load
    for name in "${CAP_SECRET_PARAMS[@]}"; do
        unset 'CAP_PARAMS[$name]' 'CAP_RAW[$name]'
    done
    declare -p CAP_PARAMS CAP_RAW CAP_CONSOLES CAP_INVALID | sed 's/^declare -\([aA]\) /declare -g\1 /' |
        cap_write_file "$CAP_CMDLINE_PARSED" 0600
}

# cap_secrets_load: CAP_PARAMS and CAP_RAW with the secret parameters too (the saved parse
# leaves them out): the command line parsed again when the boot's parse is in use.
cap_secrets_load() {
    local CAP_PARSE_QUIET=1  # the boot's parse already logged what it refused
    [[ ! -f $CAP_CMDLINE_PARSED ]] || cap_cmdline_parse
}

# Parse CMDLINE_FILE into CAP_PARAMS, and every console= value into CAP_CONSOLES. Words are
# split on blanks outside double quotes, quotes are dropped (as the kernel does), each word
# is split on its FIRST "=" so values may contain "=", a trailing newline is ignored, the
# last occurrence of a name wins, and a word holding a control character is refused (logged
# unless CAP_PARSE_QUIET is set).
cap_cmdline_parse() {
    local text raw LC_ALL=C  # bytes, whatever the locale: no byte may stop the match
    # One word: runs of characters that are neither blank nor quote, and quoted runs (blanks
    # kept; an unterminated quote runs to the end). A word at a time, not a character at a
    # time: the generator parses at every boot and the agent setup again, under emulation too.
    local word_re=$'^[ \t\n]*(([^ \t\n"]+|"[^"]*("|$))+)'
    if [[ ! -r $CMDLINE_FILE ]]; then
        # What was loaded before stays: a failed re-parse (cap_secrets_load) loses nothing.
        cap_error "cannot read the kernel command line" file="$CMDLINE_FILE"
        return 1
    fi
    CAP_PARAMS=()
    CAP_RAW=()
    CAP_CONSOLES=()  # every console= value, in order (the name keeps only the last one)
    IFS= read -r -d '' text <"$CMDLINE_FILE" || true
    while [[ $text == *$'\n' ]]; do
        text=${text%$'\n'}  # the kernel's trailing newline (and any more) is no part of a value
    done
    while [[ $text =~ $word_re ]]; do
        raw=${BASH_REMATCH[1]}
        text=${text:${#BASH_REMATCH[0]}}
        _cap_cmdline_store "${raw//\"/}" "$raw"
    done
    _cap_cmdline_check
}

# _cap_cmdline_check: hold every parameter the table knows to its kind; a value that fails is
# dropped from CAP_PARAMS and CAP_RAW, recorded in CAP_INVALID and logged once (by name, and
# with its value unless the parameter is secret or a proxy URL). Unknown parameters are left
# alone. A number (kinds port, seconds, vlan) is kept in base 10 without leading zeros.
_cap_cmdline_check() {
    local name kind
    CAP_INVALID=()
    cap_table_load
    for name in "${!CAP_PARAMS[@]}"; do
        kind=${CAP_KIND["$name"]-any}
        CAP_WHY=""
        if _cap_check "$name" "${CAP_PARAMS["$name"]}" "$kind"; then
            case $kind in
                # Numbers are read in base 10 here, once: "0514" is 514, "08" is 8 (bash's
                # arithmetic would take a leading zero for octal in every reader).
                port | seconds | vlan) CAP_PARAMS["$name"]=$((10#${CAP_PARAMS["$name"]})) ;;
                counts) CAP_PARAMS["$name"]=$((10#${CAP_PARAMS["$name"]%,*})),$((10#${CAP_PARAMS["$name"]#*,})) ;;
            esac
            continue
        fi
        CAP_INVALID["$name"]=$CAP_WHY
        if [[ -n ${CAP_PARSE_QUIET-} ]]; then
            :  # the boot's parse already logged it
        elif [[ $kind == proxy || " ${CAP_SECRET_PARAMS[*]} " == *" $name "* ]]; then
            # A credential, or a proxy URL that may hold one: the name only.
            cap_error "refusing a parameter: $CAP_WHY" param="$name"
        else
            cap_error "refusing a parameter: $CAP_WHY" param="$name" value="${CAP_PARAMS["$name"]}"
        fi
        unset 'CAP_PARAMS[$name]' 'CAP_RAW[$name]'
    done
}

# _cap_check NAME VALUE KIND: succeed when VALUE is a KIND (params.tsv's kinds); otherwise set
# CAP_WHY to what was expected and fail. "list" values are checked entry by entry by their
# consumer (a bad entry is skipped, the others apply); "any" and "kernel" are not checked.
_cap_check() {
    local name=$1 value=$2 kind=$3
    case $kind in
        any | list | kernel) return 0 ;;
        image_ref) cap_is_image_ref "$value" || CAP_WHY="not an image reference" ;;
        hostport) cap_is_hostport "$value" || CAP_WHY="expected host[:port]" ;;
        authority) [[ $value == *:* ]] && cap_is_hostport "$value" || CAP_WHY="expected host:port" ;;
        credential) cap_param_verbatim "$name" ||
            CAP_WHY="a double quote inside does not survive the kernel command line" ;;
        bool) cap_bool "$value" >/dev/null || CAP_WHY="not a boolean (true/false, 1/0, t/f, yes/no, on/off)" ;;
        proxy) cap_is_proxy "$value" || CAP_WHY="not a proxy URL (http://, https:// or socks5://[user:pass@]host[:port])" ;;
        host) cap_is_ipv4 "$value" || cap_is_ipv6 "$value" || cap_is_hostname "$value" ||
            CAP_WHY="not a host name or IP address" ;;
        port) cap_is_port "$value" || CAP_WHY="not a port (1-65535)" ;;
        ifname) cap_is_ifname "$value" || CAP_WHY="not an interface name" ;;
        mac) cap_is_mac "$value" || CAP_WHY="not a MAC address" ;;
        vlan) cap_is_vlan "$value" || CAP_WHY="not a VLAN id (1-4094)" ;;
        ipam) cap_check_ipam "$value" ;;
        id) [[ -n $value && ! $value =~ [[:space:]] ]] || CAP_WHY="empty or holds a blank" ;;
        seconds) [[ $value =~ ^[0-9]{1,4}$ ]] || CAP_WHY="not a number of seconds (0-9999)" ;;
        counts) [[ $value =~ ^[0-9]{1,3},[0-9]{1,3}$ ]] || CAP_WHY="expected two counts, like 2,1" ;;
        choice:*) [[ ,${kind#choice:}, == *,"$value",* ]] || CAP_WHY="expected one of ${kind#choice:}" ;;
        *) CAP_WHY="unknown kind $kind in the parameter table" ;;
    esac
    [[ -z $CAP_WHY ]]
}

_cap_cmdline_store() {
    local word=$1 raw=$2 name
    name=${word%%=*}
    [[ -n $name ]] || return 0  # an empty word, or one like "=x" that names nothing
    if [[ $word == *[[:cntrl:]]* ]]; then
        # A newline, tab or other control character (inside quotes, or a raw byte) would become
        # a second line in a file, or a value no check expects: the word is refused, and an
        # earlier word of the same name is dropped with it (this one was meant to win).
        unset 'CAP_PARAMS[$name]' 'CAP_RAW[$name]'
        [[ -n ${CAP_PARSE_QUIET-} ]] ||
            cap_error "refusing a parameter: its value holds a control character (a newline inside quotes?)" param="$name"
        return 0
    fi
    if [[ $word == *=* ]]; then
        CAP_PARAMS["$name"]=${word#*=}
    else
        CAP_PARAMS["$name"]=""
    fi
    CAP_RAW["$name"]=$raw
    [[ $name != console || $word != *=* ]] || CAP_CONSOLES+=("${word#*=}")
}

# cap_param_verbatim NAME: succeed when the value of NAME is exactly what was written: its
# word holds no double quote, or one pair around the whole word or around the value. Any
# other quote changes the value on its way through the kernel (it joins words), so a secret
# holding one cannot be passed on the command line.
cap_param_verbatim() {
    local raw=${CAP_RAW["$1"]-}
    [[ $raw == *'"'* ]] || return 0
    if [[ ${#raw} -ge 2 && $raw == '"'*'"' ]]; then
        raw=${raw:1:${#raw}-2}  # "name=value"
    else
        raw=${raw#*=}
        [[ ${#raw} -ge 2 && $raw == '"'*'"' ]] || return 1
        raw=${raw:1:${#raw}-2}  # name="value"
    fi
    [[ $raw != *'"'* ]]
}

# cap_param NAME: print the value of NAME; fail (status 1, no output) when it is absent.
cap_param() {
    [[ -v CAP_PARAMS["$1"] ]] || return 1
    printf '%s' "${CAP_PARAMS["$1"]}"
}

# cap_param_or NAME DEFAULT: the value of NAME, or DEFAULT when absent or empty.
cap_param_or() {
    local value=${CAP_PARAMS["$1"]-}
    printf '%s' "${value:-$2}"
}

# cap_refused NAME: succeed when the parse refused NAME's value (logged once by the parse).
cap_refused() {
    [[ -v CAP_INVALID["$1"] ]]
}

# --- Validators: each succeeds or fails silently; callers log what was wrong. ---

# A network interface name as the kernel takes it: 1-15 characters, no "/" or blank, not "." or "..".
cap_is_ifname() {
    [[ $1 =~ ^[A-Za-z0-9_.:-]{1,15}$ && $1 != . && $1 != .. ]]
}

# cap_check_ipam VALUE: VALUE is <mac>:<vlan>:<ip>:<mask>:<gw>:<host>:<dns,..>:<search,..>:<ntp,..>
# with a valid MAC, IPv4 address and netmask and every other field empty or valid; otherwise
# CAP_WHY says which field is wrong and it fails. (network-setup applies what passes.)
cap_check_ipam() {
    local rest
    local -a f
    CAP_WHY=""
    # Exactly 9 fields: 8 colons. IFS splitting would drop trailing empty fields, so count.
    rest=${1//[^:]/}
    if [[ ${#rest} -ne 8 ]]; then
        CAP_WHY="expected 9 colon-separated fields, not $((${#rest} + 1))"
        return 1
    fi
    IFS=: read -r -a f <<<"$1:"
    if ! cap_is_mac "${f[0]}"; then
        CAP_WHY="invalid MAC address"
    elif [[ -n ${f[1]} ]] && ! cap_is_vlan "${f[1]}"; then
        CAP_WHY="VLAN id must be 1-4094"
    elif ! cap_is_ipv4 "${f[2]}"; then
        CAP_WHY="invalid IPv4 address"
    elif ! cap_netmask_prefix "${f[3]}" >/dev/null; then
        CAP_WHY="invalid netmask"
    elif [[ -n ${f[4]} ]] && ! cap_is_ipv4 "${f[4]}"; then
        CAP_WHY="invalid gateway"
    elif [[ -n ${f[5]} ]] && ! cap_is_machine_hostname "${f[5]}"; then
        CAP_WHY="invalid hostname"
    elif ! cap_csv_valid "${f[6]}" cap_is_ipv4; then
        CAP_WHY="invalid DNS server list"
    elif ! cap_csv_valid "${f[7]}" cap_is_hostname; then
        CAP_WHY="invalid search domain list"
    elif ! cap_csv_valid "${f[8]}" _cap_is_ntp_server; then
        CAP_WHY="invalid NTP server list"
    fi
    [[ -z ${CAP_WHY-} ]]
}

# cap_csv_valid LIST CHECK: every comma-separated item of LIST passes CHECK (empty list passes).
cap_csv_valid() {
    local list=$1 check=$2 item IFS=,
    for item in $list; do
        "$check" "$item" || return 1
    done
}

_cap_is_ntp_server() {
    cap_is_ipv4 "$1" || cap_is_hostname "$1"
}

# A MAC address with ":" or "-" separators.
cap_is_mac() {
    [[ $1 =~ ^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$ ]]
}

# cap_mac_normalize MAC: lower case, colon separated.
cap_mac_normalize() {
    local mac=${1//-/:}
    printf '%s' "${mac,,}"
}

# cap_boot_links: fill BOOT_LINKS with the interface indexes whose MAC is hw_addr= (the NIC
# Smee booted, and a VLAN on it: a VLAN keeps its parent's MAC), lowest first; fails when
# hw_addr is missing or invalid. Reads $ROOT/sys/class/net in bash: its callers run on every
# lease and link change, and programs cost under emulation.
declare -ga BOOT_LINKS=()
cap_boot_links() {
    local want dev index mac
    local -a devs
    BOOT_LINKS=()
    want=$(cap_param hw_addr) && cap_is_mac "$want" || return 1
    want=$(cap_mac_normalize "$want")
    set +o noglob
    devs=("$ROOT/sys/class/net"/*)
    set -o noglob
    for dev in "${devs[@]}"; do
        { read -r index <"$dev/ifindex" && read -r mac <"$dev/address"; } 2>/dev/null || continue
        [[ ${mac,,} == "$want" && $index =~ ^[0-9]+$ ]] && BOOT_LINKS+=("$((10#$index))")
    done
    if ((${#BOOT_LINKS[@]} > 1)); then
        mapfile -t BOOT_LINKS < <(printf '%s\n' "${BOOT_LINKS[@]}" | sort -n)
    fi
    return 0
}

# A dotted-quad IPv4 address, each octet 0-255 without leading zeros.
cap_is_ipv4() {
    local IFS=. octet
    [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
    for octet in $1; do
        [[ $octet == 0 || $octet != 0* ]] || return 1
        ((octet <= 255)) || return 1
    done
}

# An IPv6 address as text (RFC 4291): eight groups of 1-4 hex digits, or fewer with one "::"
# standing for the zero groups left out; the last 32 bits may be written as an IPv4 address.
# No zone (%eth0) and no brackets.
cap_is_ipv6() {
    local addr=$1 head tail n_head n_tail
    [[ $addr =~ ^[0-9A-Fa-f:.]{2,45}$ && $addr == *:* && $addr != *::*::* ]] || return 1
    if [[ $addr == *.* ]]; then  # an IPv4 tail: two groups
        cap_is_ipv4 "${addr##*:}" || return 1
        addr=${addr%:*}:0:0
    fi
    if [[ $addr == *::* ]]; then
        head=${addr%%::*} tail=${addr#*::}
        n_head=$(_cap_ipv6_groups "$head") && n_tail=$(_cap_ipv6_groups "$tail") || return 1
        ((n_head + n_tail <= 7))
    else
        [[ $(_cap_ipv6_groups "$addr") == 8 ]]
    fi
}

# _cap_ipv6_groups LIST: print how many groups a ":"-separated list of 1-4 hex digits holds
# (0 for ""); fail on an empty or bad group.
_cap_ipv6_groups() {
    local group count=0 IFS=:
    [[ -n $1 ]] || { printf 0; return 0; }
    [[ $1 != :* && $1 != *: && $1 != *::* ]] || return 1
    for group in $1; do
        [[ $group =~ ^[0-9A-Fa-f]{1,4}$ ]] || return 1
        count=$((count + 1))
    done
    printf '%s' "$count"
}

# cap_netmask_prefix MASK: print the prefix length of a dotted netmask or of "0".."32".
cap_netmask_prefix() {
    local mask=$1 IFS=. octet bits=0 seen_zero=0 b
    if [[ $mask =~ ^/?[0-9]{1,3}$ ]]; then  # a prefix length, base 10 (024 is 24)
        mask=${mask#/}
        ((10#$mask <= 32)) || return 1
        printf '%d' "$((10#$mask))"
        return 0
    fi
    cap_is_ipv4 "$mask" || return 1
    for octet in $mask; do
        for ((b = 7; b >= 0; b--)); do
            if (((octet >> b) & 1)); then
                ((seen_zero == 0)) || return 1  # a one after a zero: not a netmask
                bits=$((bits + 1))
            else
                seen_zero=1
            fi
        done
    done
    printf '%d' "$bits"
}

# An 802.1Q VLAN id: 1-4094.
cap_is_vlan() {
    [[ $1 =~ ^[0-9]{1,4}$ ]] && ((10#$1 >= 1 && 10#$1 <= 4094))
}

# An RFC 1123 host name (labels of letters, digits and inner hyphens).
cap_is_hostname() {
    local label IFS=.
    [[ -n $1 && ${#1} -le 253 && $1 != .* && $1 != *. && $1 != *..* ]] || return 1
    for label in $1; do
        [[ $label =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$ ]] || return 1
    done
}

# The host name of this machine: a valid host name that the kernel keeps whole (it stores at
# most 64 bytes and cuts longer names silently).
cap_is_machine_hostname() {
    [[ ${#1} -le 64 ]] && cap_is_hostname "$1"
}

# A TCP/UDP port number.
cap_is_port() {
    [[ $1 =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535))
}

# host, host:port, IPv4:port, [IPv6] or [IPv6]:port.
cap_is_hostport() {
    local host=$1 port=""
    if [[ $host =~ ^\[([0-9A-Fa-f:.]+)\](:([0-9]+))?$ ]]; then
        port=${BASH_REMATCH[3]}
        cap_is_ipv6 "${BASH_REMATCH[1]}" || return 1
    else
        if [[ $host == *:* ]]; then
            port=${host##*:}
            host=${host%:*}
            [[ -n $port ]] || return 1
        fi
        cap_is_ipv4 "$host" || cap_is_hostname "$host" || return 1
    fi
    [[ -z $port ]] || cap_is_port "$port"
}

# cap_bool VALUE: print "true" or "false"; fail for anything else. Every spelling Go's
# strconv.ParseBool takes (what Smee writes: 1 t T TRUE true True, 0 f F FALSE false False),
# and, in any case, yes/no/on/off.
cap_bool() {
    case ${1,,} in
        1 | t | true | yes | on) printf 'true' ;;
        0 | f | false | no | off) printf 'false' ;;
        *) return 1 ;;
    esac
}

# A container image reference: [registry[:port]/]path[:tag][@digest], printable, no blanks;
# the registry may be an IPv6 address in brackets ([fd77::1]:5000/path).
cap_is_image_ref() {
    local ref=$1
    [[ ${#ref} -le 512 && $ref != *//* ]] || return 1
    if [[ $ref == \[* ]]; then
        [[ $ref == */?* ]] && cap_is_hostport "${ref%%/*}" || return 1
        ref=${ref#*/}
    fi
    [[ $ref =~ ^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$ ]]
}

# cap_image_registry REF: print the registry host of an image reference, as containerd
# resolves it (the first path component when it has a "." or ":" or is "localhost").
cap_image_registry() {
    local first=${1%%/*}
    if [[ $1 == */* && ( $first == *.* || $first == *:* || $first == localhost ) ]]; then
        printf '%s' "$first"
    else
        printf 'docker.io'
    fi
}

# A registry mirror URL: http(s)://host[:port][/path], no user or password, and only
# characters that need no escaping in hosts.toml's quoted keys (letters, digits,
# . _ ~ / : % - and the brackets of an IPv6 address).
cap_is_mirror_url() {
    local rest=${1#*://} host
    [[ $1 =~ ^https?://[][A-Za-z0-9._~/:%-]+$ ]] || return 1
    host=${rest%%/*}
    cap_is_hostport "$host"
}

# cap_image_full REF: the fully qualified form of an image reference, as docker and
# containerd write it (docker.io/library/ for Docker Hub short names, :latest without a tag
# or digest): the names import-images lists.
cap_image_full() {
    local ref=$1 domain rest
    domain=$(cap_image_registry "$ref")
    rest=$ref
    [[ $ref != "$domain"/* ]] || rest=${ref#*/}  # the registry was written out: strip it
    [[ $domain != index.docker.io ]] || domain=docker.io
    [[ $domain != docker.io || $rest == */* ]] || rest=library/$rest
    [[ $rest == *@* || ${rest##*/} == *:* ]] || rest+=:latest
    printf '%s/%s' "$domain" "$rest"
}

# A proxy URL: scheme://[userinfo@]host[:port][/]. The user information takes what Go's
# url.Parse takes (it splits at the last "@"; a "%" must start two hex digits): a URL it
# refuses would be announced here and then ignored by every Go program without a word.
cap_is_proxy() {
    local authority userinfo
    [[ $1 =~ ^(https?|socks5)://([^/]+)/?$ ]] || return 1
    authority=${BASH_REMATCH[2]}
    if [[ $authority == *@* ]]; then
        userinfo=${authority%@*}
        authority=${authority##*@}
        [[ $userinfo =~ ^([A-Za-z0-9._~!\$\&\'()*+,\;=:@-]|%[0-9A-Fa-f]{2})*$ ]] || return 1
    fi
    [[ -n $authority ]] && cap_is_hostport "$authority"
}

# cap_export_proxies announce|quiet: export HTTP_PROXY, HTTPS_PROXY and NO_PROXY from the command
# line in both spellings (containerd, nerdctl and the agent read either). A proxy URL the
# parse refused is absent (the parse logged its name, not the URL: it may hold a password);
# with "announce", each one set is logged.
cap_export_proxies() {
    local name value
    for name in HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        value=$(cap_param "$name") || continue  # absent, or refused by the parse (logged there)
        export "$name=$value" "${name,,}=$value"
        [[ ${1-} != announce ]] || cap_info "proxy configured" param="$name"
    done
}

# cap_write_file PATH MODE: write stdin to PATH atomically (temp file + rename) with MODE,
# creating the directory. The temp file gets MODE before any byte is written.
cap_write_file() {
    local path=$1 mode=$2 tmp
    mkdir -p "$(dirname "$path")"
    tmp=$(mktemp "$path.XXXXXX")
    chmod "$mode" "$tmp"
    cat >"$tmp"
    mv -f "$tmp" "$path"
}

# cap_wait_containerd SOCKET: return once containerd answers on SOCKET (our units are ordered
# after containerd.service, but a restarting containerd must not fail them).
cap_wait_containerd() {
    local delay=1
    until nerdctl --address "$1" version >/dev/null 2>&1; do
        cap_info "waiting for containerd" socket="$1"
        sleep "$delay"
        delay=$((delay * 2 > 10 ? 10 : delay * 2))  # 1, 2, 4, 8, then every 10 s
    done
}
