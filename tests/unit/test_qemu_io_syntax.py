"""The qemu-io command parser: every expectation here was checked against qemu-io 7.2."""

from __future__ import annotations

import pytest

from dirtybits.proto import qemu_io as syn
from dirtybits.proto.qemu_io import (
    Alloc,
    CommandError,
    Discard,
    Flush,
    Help,
    Info,
    Length,
    Map,
    Quit,
    Read,
    Sleep,
    Truncate,
    Write,
    parse_command,
    parse_pattern,
    parse_size,
)

EINVAL = "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {}"
ERANGE = "Parsing error: argument too large -- {}"
READ_USAGE = ("read [-abCqv] [-P pattern [-s off] [-l len]] off len -- "
              "reads a number of bytes at a specified offset")


def error_of(line: str, *, readonly: bool = False) -> CommandError:
    with pytest.raises(CommandError) as info:
        parse_command(line, readonly=readonly)
    return info.value


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("010", 10),  # decimal even with a leading zero
    ("1b", 1), ("1B", 1), ("1k", 1024), ("4K", 4096), ("64k", 65536), ("1m", 1 << 20),
    ("2M", 2 << 20), ("1g", 1 << 30), ("1T", 1 << 40), ("1p", 1 << 50), ("1E", 1 << 60),
    ("0x1000", 4096), ("0X10", 16), ("0x1E", 30), ("0x1b", 27),  # E and b are hex digits
    ("+16", 16), ("1.5k", 1536), ("0.5k", 512), ("1.0", 1), ("1.", 1), ("1.k", 1024),
    ("1.1k", 1126), ("4.5K", 4608), ("1.00048828125k", 1025), ("0.00048828125k", 1),
    ("0.0004k", 0), ("1.999999999999999999999k", 1024),  # fraction rounds to 1.0: dropped
    ("9223372036854775807", (1 << 63) - 1), ("7E", 7 << 60),
])
def test_parse_size_matches_qemu_strtosz(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "abc", "4q", "1s", "1kb", "1KiB", "1.5", "0.1", "1.5b", "1e3", "1.5e3k", ".5k",
    "0x1.8k", "0b101", "inf", "nan", "0x", "0xg", "-1", "+-1", "1-", "",
    "99999999999999999999k",  # the integer overflows first, then the suffix is junk
])
def test_parse_size_rejects_what_qemu_rejects(text: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_size(text)
    assert info.value.message == EINVAL.format(text)
    assert not info.value.stderr


@pytest.mark.parametrize("text", [
    "9223372036854775808", "8E", "16E", "18446744073709551615", "99999999999999999999",
    "0x8000000000000000", "0x10000000000000000",
])
def test_parse_size_too_large(text: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_size(text)
    assert info.value.message == ERANGE.format(text)


def test_hex_with_suffix_is_accepted_with_a_warning() -> None:
    warnings: list[str] = []
    assert parse_size("0x10k", warnings.append) == 16 << 10
    assert warnings == ["Using a multiplier suffix on hex numbers is deprecated: 0x10k"]
    assert parse_size("16k", warnings.append) == 16 << 10
    assert len(warnings) == 1


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("171", 171), ("0xab", 0xAB), ("0XFF", 255), ("010", 8), ("+7", 7), ("-0", 0),
    ("255", 255),
])
def test_pattern_is_strtol_base_0(text: str, value: int) -> None:
    assert parse_pattern(text) == value
    assert parse_pattern(text) == value  # the cached answer is the same


@pytest.mark.parametrize("text", ["256", "-1", "08", "0x", "abc", "0x100", "1k"])
def test_invalid_pattern(text: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_pattern(text)
    assert info.value.message == f"{text} is not a valid pattern byte"


# ---------------------------------------------------------------------------- line splitting


def test_words_are_split_on_spaces_only() -> None:
    assert syn.split_line("  read   0  4k ") == ["read", "0", "4k"]
    assert syn.split_line("read\t0 1") == ["read\t0", "1"]
    assert parse_command("") is None
    assert parse_command("    ") is None
    assert error_of("read\t0 1").message == 'command "read\t0" not found'


# ---------------------------------------------------------------------------- read


def test_read_defaults_and_flags() -> None:
    assert parse_command("read 512 1k") == Read(512, 1024, pattern_count=1024)
    cmd = parse_command("read -qv -C -P 0xab 0 64k")
    assert cmd == Read(0, 65536, 0xAB, 0, 65536, quiet=True, verbose=True, machine=True)
    assert parse_command("r -p 0 1") == Read(0, 1, pattern_count=1)  # -p: ignored


def test_read_options_after_operands_are_permuted_like_gnu_getopt() -> None:
    assert parse_command("read 0 512 -q -P0") == Read(0, 512, 0, 0, 512, quiet=True)


def test_read_pattern_window() -> None:
    assert parse_command("read -P 1 -s 8 -l 4 0 16") == Read(0, 16, 1, 8, 4)
    assert parse_command("read -P 1 -s 8 0 16") == Read(0, 16, 1, 8, 8)  # rest of the read
    assert error_of("read -P 1 -l 17 0 16").message == (
        "pattern verification range exceeds end of read data")
    assert error_of("read -P 1 -s 17 0 16").message == (
        "pattern verification range exceeds end of read data")


def test_read_window_without_pattern_prints_usage() -> None:
    exc = error_of("read -l 5 0 16")
    assert (exc.message, exc.stderr, exc.usage) == (READ_USAGE, False, None)


def test_getopt_complaints_go_to_stderr_with_usage_on_stdout() -> None:
    exc = error_of("read -x 0 1")
    assert (exc.message, exc.stderr, exc.usage) == ("read: invalid option -- 'x'", True,
                                                    READ_USAGE)
    exc = error_of("read 0 1 -P")
    assert exc.message == "read: option requires an argument -- 'P'"
    assert exc.usage == READ_USAGE
    assert error_of("read --foo 0 1").message == "read: invalid option -- '-'"
    assert error_of("read 0 -1").message == "read: invalid option -- '1'"


def test_double_dash_ends_options() -> None:
    assert error_of("read -q -- -1 1").message == EINVAL.format("-1")
    assert parse_command("read -- 0 16") == Read(0, 16, pattern_count=16)


def test_wrong_operand_count_prints_usage() -> None:
    assert error_of("read 0 1 2").message == READ_USAGE


def test_option_values_are_checked_in_order() -> None:
    # qemu-io parses -P while reading options: its error wins over a later unknown option.
    assert error_of("read -P 999 -x 0 1").message == "999 is not a valid pattern byte"


def test_length_limit() -> None:
    assert error_of("read 0 3G").message == "length cannot exceed 2147483136, given 3G"
    assert parse_command("read 0 2147483136") == Read(0, 2147483136,
                                                      pattern_count=2147483136)


def test_vmstate_requests_must_be_sector_aligned() -> None:
    assert error_of("read -b 1 512").message == "1 is not a sector-aligned value for 'offset'"
    assert error_of("read -b 0 511").message == "511 is not a sector-aligned value for 'count'"
    assert parse_command("read 1 511") == Read(1, 511, pattern_count=511)  # bytes are fine


# ---------------------------------------------------------------------------- write


def test_write_defaults_to_0xcd() -> None:
    assert parse_command("write 1 3") == Write(1, 3, pattern=0xCD)
    assert parse_command("w -q 0 1") == Write(0, 1, quiet=True)


def test_write_fast_path_agrees_with_getopt_path() -> None:
    fast = parse_command("write -P 0xab 4096 64k")
    assert fast == Write(4096, 65536, 0xAB)
    assert parse_command("write -P0xab 4096 64k") == fast
    assert parse_command("write 4096 64k -P 0xab") == fast
    # Same complaint order on both paths: the pattern before the offset.
    assert error_of("write -P 999 abc 1").message == "999 is not a valid pattern byte"
    assert error_of("write -P 1 0 3G").message == (
        "length cannot exceed 2147483136 without -n, given 3G")


def test_write_zeroes_flags() -> None:
    assert parse_command("write -z -u 4k 4k") == Write(4096, 4096, zeroes=True, unmap=True)
    assert parse_command("write -z -n 0 3G") == Write(0, 3 << 30, zeroes=True,
                                                      no_fallback=True)
    assert parse_command("write -z -z -q 0 1") == Write(0, 1, zeroes=True, quiet=True)


def test_last_pattern_wins() -> None:
    assert parse_command("write -P 1 -P 2 0 1") == Write(0, 1, 2)


@pytest.mark.parametrize(("line", "message"), [
    ("write -u 0 4k", "-u requires -z to be specified"),
    ("write -n 0 512", "-n requires -z to be specified"),
    ("write -z -P 1 0 4k", "Only one of -z, -P, and -s can be specified at the same time"),
    ("write -s f -P 1 0 8", "Only one of -z, -P, and -s can be specified at the same time"),
    ("write -b -z 0 512", "-b and -z cannot be specified at the same time"),
    ("write -f -c 0 512", "-f and -b or -c cannot be specified at the same time"),
    ("write -c 1 512", "1 is not a sector-aligned value for 'offset'"),
    ("write -z 0 2G", "length cannot exceed 2147483136 without -n, given 2G"),
    ("write -P 256 0 4k", "256 is not a valid pattern byte"),
    ("write 4q 4k", EINVAL.format("4q")),
])
def test_write_rejections(line: str, message: str) -> None:
    exc = error_of(line)
    assert (exc.message, exc.stderr) == (message, False)


def test_write_source_file() -> None:
    assert parse_command("write -s pat.bin 0 8") == Write(0, 8, source_file="pat.bin")


# ---------------------------------------------------------------------------- the others


def test_discard() -> None:
    assert parse_command("discard -q 0 64k") == Discard(0, 65536, quiet=True)
    assert parse_command("d -C 4k 4k") == Discard(4096, 4096, machine=True)
    assert error_of("discard 0 3G").message == "length cannot exceed 2147483136, given 3G"


def test_argumentless_commands_and_aliases() -> None:
    assert parse_command("flush") == Flush()
    assert parse_command("f") == Flush()
    assert parse_command("length") == parse_command("l") == Length()
    assert parse_command("info") == parse_command("i") == Info()
    assert parse_command("map") == Map()
    assert parse_command("quit") == parse_command("q") == Quit()
    assert parse_command("quit now please") == Quit()  # quit takes any arguments


def test_truncate() -> None:
    assert parse_command("truncate 2M") == Truncate(2 << 20)
    assert parse_command("t -m full 3M") == Truncate(3 << 20, "full")
    assert parse_command("truncate 2M junk") == Truncate(2 << 20)  # qemu ignores extra words
    exc = error_of("truncate -m bogus 1M")
    assert (exc.message, exc.stderr, exc.prefixed) == (
        "Invalid preallocation mode 'bogus'", True, True)
    # qemu-io names argv[1] in this message, even when that is "-m".
    assert error_of("truncate -m off abc").message == EINVAL.format("-m")
    assert error_of("truncate abc").message == EINVAL.format("abc")


def test_truncate_without_size_is_a_usage_error() -> None:
    # qemu-io 7.2 segfaults on this line.
    assert error_of("truncate -m full").message.startswith("truncate [-m prealloc_mode] off")


def test_alloc_sleep_help() -> None:
    assert parse_command("alloc 4k") == Alloc(4096, 512)
    assert parse_command("a 0 1M") == Alloc(0, 1 << 20)
    assert parse_command("sleep 10") == Sleep(10)
    assert parse_command("sleep 0x10") == Sleep(16)
    assert parse_command("sleep 010") == Sleep(8)
    for bad in ("abc", "-5", "1k", "08"):
        assert error_of(f"sleep {bad}").message == f"{bad} is not a valid number"
    assert parse_command("help") == Help()
    assert parse_command("? read") == Help("read")


@pytest.mark.parametrize(("line", "message"), [
    ("read", "bad argument count 0 to read, expected at least 2 arguments"),
    ("read 0", "bad argument count 1 to read, expected at least 2 arguments"),
    ("flush 1", "bad argument count 1 to flush, expected 0 arguments"),
    ("map 1", "bad argument count 1 to map, expected 0 arguments"),
    ("sleep", "bad argument count 0 to sleep, expected 1 arguments"),
    ("alloc", "bad argument count 0 to alloc, expected between 1 and 2 arguments"),
    ("truncate 1 2 3 4", "bad argument count 4 to truncate, expected between 1 and 3 arguments"),
    ("bogus", 'command "bogus" not found'),
    ("aio_write 0 1", 'command "aio_write" is not supported by dirtybits io'),
    ("writev 0 1", 'command "writev" is not supported by dirtybits io'),
])
def test_command_level_errors_go_to_stderr(line: str, message: str) -> None:
    exc = error_of(line)
    assert (exc.message, exc.stderr, exc.usage, exc.prefixed) == (message, True, None, False)


def test_read_only_refuses_writing_commands_before_looking_at_options() -> None:
    for line in ("write -P 999 0 1", "discard 0 4k", "truncate 2M", "w 0 1", "d 0 1"):
        exc = error_of(line, readonly=True)
        assert (exc.message, exc.stderr, exc.prefixed) == ("Block node is read-only", True, True)
    # The argument count is checked first, as qemu-io does.
    assert error_of("write 0", readonly=True).message.startswith("bad argument count 1")
    assert parse_command("read 0 1", readonly=True) == Read(0, 1, pattern_count=1)
    assert parse_command("flush", readonly=True) == Flush()


def test_help_lines_follow_qemu_format() -> None:
    assert syn.help_line(syn.SPECS["flush"]) == "flush -- flush all in-core file state to disk"
    assert syn.help_line(syn.SPECS["map"]) == "map  -- prints the allocated areas of a file"
    assert syn.help_line(syn.SPECS["read"]) == READ_USAGE
