"""Syslog parsing (RFC 5424 and 3164) and the UDP receiver on 127.0.0.1."""

import socket

from captainos.lab import syslogd


def test_rfc5424_all_fields():
    raw = (b'<134>1 2026-11-25T17:00:00.123456+00:00 captainos tink-agent 812 ID47 '
           b'[exampleSDID@32473 iut="3" eventSource="App\\]lication"][other@1 a="b"] \xef\xbb\xbfhello world')
    msg = syslogd.parse(raw, peer="127.0.0.1:1234")
    assert (msg.facility, msg.severity, msg.version) == (16, 6, 1)
    assert msg.timestamp == "2026-11-25T17:00:00.123456+00:00"
    assert (msg.hostname, msg.app, msg.procid, msg.msgid) == ("captainos", "tink-agent", "812", "ID47")
    assert msg.structured_data == '[exampleSDID@32473 iut="3" eventSource="App\\]lication"][other@1 a="b"]'
    assert msg.msg == "hello world"
    assert msg.peer == "127.0.0.1:1234"


def test_rfc5424_nil_values_and_json_message():
    msg = syslogd.parse('<14>1 - host - - - - {"msg":"received action"}\n')
    assert (msg.timestamp, msg.app, msg.procid, msg.msgid, msg.structured_data) == ("", "", "", "", "")
    assert msg.hostname == "host"
    assert msg.msg == '{"msg":"received action"}'


def test_rfc5424_without_message():
    msg = syslogd.parse("<165>1 2003-10-11T22:14:15.003Z mymachine evntslog - ID47 -")
    assert msg.app == "evntslog" and msg.msg == "" and msg.severity == 5 and msg.facility == 20


def test_rfc3164():
    msg = syslogd.parse(b"<34>Oct 11 22:14:15 mymachine su[230]: 'su root' failed for lonvick on /dev/pts/8")
    assert (msg.version, msg.facility, msg.severity) == (0, 4, 2)
    assert (msg.timestamp, msg.hostname, msg.app, msg.procid) == ("Oct 11 22:14:15", "mymachine", "su", "230")
    assert msg.msg == "'su root' failed for lonvick on /dev/pts/8"


def test_rfc3164_without_hostname_as_busybox_sends_it():
    msg = syslogd.parse(b'<13>Nov 25 17:41:00 tink-agent: {"msg":"x"}\n')
    assert (msg.hostname, msg.app, msg.msg) == ("", "tink-agent", '{"msg":"x"}')
    msg = syslogd.parse(b"<13>Nov 25 17:41:00 app[12]: hi")
    assert (msg.hostname, msg.app, msg.procid, msg.msg) == ("", "app", "12", "hi")
    single = syslogd.parse(b"<13>Nov 25 17:41:00 word")
    assert (single.hostname, single.msg) == ("", "word")


def test_rfc3164_without_header_and_garbage():
    assert syslogd.parse("<13>just text").msg == "just text"
    tagged = syslogd.parse("<13>containerd: started")
    assert (tagged.app, tagged.msg) == ("containerd", "started")
    junk = syslogd.parse(b"\xff\xfe not syslog")
    assert junk.version == 0 and "not syslog" in junk.msg
    assert syslogd.parse("<999>1 x").msg == "<999>1 x"  # PRI out of range: kept whole


def test_broken_structured_data_falls_back_without_raising():
    msg = syslogd.parse('<14>1 - h app - - [unterminated a="b" rest')
    assert msg.version == 0 and msg.msg == "1 - h app - - [unterminated a=\"b\" rest"


def test_receiver_records_datagrams():
    with syslogd.Receiver(bind="127.0.0.1") as rx:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(3):
                sock.sendto(f"<14>1 - vm app - - - line {i}".encode(), ("127.0.0.1", rx.port))
        found = rx.wait_for(lambda m: m.msg == "line 2", timeout=5)
        assert found is not None and found.hostname == "vm" and found.received > 0
        assert [m.msg for m in rx.snapshot()] == ["line 0", "line 1", "line 2"]
        assert rx.wait_for(lambda m: m.msg == "never", timeout=0.3) is None
