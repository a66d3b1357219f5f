"""QEMU's keyval syntax, its JSON alternative and the flat QemuOpts syntax."""

from __future__ import annotations

import pytest

from blockd.qmp.keyval import (
    KeyvalError,
    parse_keyval,
    parse_keyval_words,
    parse_option,
    parse_qemu_opts,
)


def test_flat_dotted_and_escaped_comma() -> None:
    text = "driver=file,node-name=f0,filename=a,,b.img,cache.direct=on"
    assert parse_keyval(text) == {
        "driver": "file",
        "node-name": "f0",
        "filename": "a,b.img",
        "cache": {"direct": "on"},
    }


def test_values_stay_strings() -> None:
    assert parse_keyval("size=1024,read-only=on") == {"size": "1024", "read-only": "on"}


def test_empty_text_and_trailing_comma() -> None:
    assert parse_keyval("") == {}
    assert parse_keyval("a=1,") == {"a": "1"}


def test_empty_value_and_value_with_equals() -> None:
    assert parse_keyval("a=,b=x=y") == {"a": "", "b": "x=y"}


def test_escaped_commas_in_a_row() -> None:
    assert parse_keyval("a=x,,,,y,b=z") == {"a": "x,,y", "b": "z"}


def test_last_assignment_wins() -> None:
    assert parse_keyval("a=1,a=2") == {"a": "2"}


def test_deep_nesting_merges_siblings() -> None:
    assert parse_keyval("a.b.c=1,a.b.d=2,a.e=3") == {"a": {"b": {"c": "1", "d": "2"}, "e": "3"}}


def test_numeric_keys_become_lists_in_index_order() -> None:
    assert parse_keyval("a.1=y,a.0=x") == {"a": ["x", "y"]}


def test_lists_of_objects_and_nested_lists() -> None:
    assert parse_keyval("s.0.host=h,s.0.port=1,s.1.host=g,m.0.0=x") == {
        "s": [{"host": "h", "port": "1"}, {"host": "g"}],
        "m": [["x"]],
    }


def test_implied_key() -> None:
    assert parse_keyval("file,filename=x", "driver") == {"driver": "file", "filename": "x"}
    assert parse_keyval("null-co", "driver") == {"driver": "null-co"}


def test_implied_key_not_used_when_first_element_has_equals() -> None:
    assert parse_keyval("driver=file", "driver") == {"driver": "file"}


def test_implied_key_only_for_the_first_element() -> None:
    with pytest.raises(KeyvalError, match=r"^Expected '=' after parameter 'y'$"):
        parse_keyval("x,y", "driver")


def test_downstream_extension_names() -> None:
    assert parse_keyval("__com.redhat_x=1") == {"__com.redhat_x": "1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a", "Expected '=' after parameter 'a'"),
        ("a.b", "Expected '=' after parameter 'a.b'"),
        ("a=1,b", "Expected '=' after parameter 'b'"),
        ("=1", "Invalid parameter ''"),
        ("a..b=1", "Invalid parameter 'a..b'"),
        ("a.=1", "Invalid parameter 'a.'"),
        ("0=1", "Invalid parameter '0'"),
        ("a.0x=1", "Invalid parameter 'a.0x'"),
        ("a b=1", "Invalid parameter 'a b'"),
        ("a.b=1,a=2", "Parameters 'a.*' used inconsistently"),
        ("a=2,a.b=1", "Parameters 'a.*' used inconsistently"),
        ("x.a.b=1,x.a=2", "Parameters 'x.a.*' used inconsistently"),
        ("a.0=x,a.b=y", "Parameters 'a.*' used inconsistently"),
        ("x.a.0=x,x.a.b=y", "Parameters 'x.a.*' used inconsistently"),
        ("a.1=x", "Parameter 'a.0' missing"),
        ("a.0=x,a.2=y", "Parameter 'a.1' missing"),
        ("a.99999999999=x", "Parameter 'a.0' missing"),
        ("x" * 128 + "=1", "Parameter '" + "x" * 128 + "' is too long"),
        ("a." + "x" * 128 + "=1", "Parameter fragment '" + "x" * 128 + "' is too long"),
    ],
)
def test_errors_use_qemus_text(text: str, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        parse_keyval(text)
    assert str(info.value) == message


def test_fragment_of_127_characters_is_fine() -> None:
    assert parse_keyval("x" * 127 + "=1") == {"x" * 127: "1"}


def test_keyval_error_is_a_value_error() -> None:
    assert issubclass(KeyvalError, ValueError)


def test_words_parse_as_one_option() -> None:
    assert parse_keyval_words(["a.0=x", "a.1=y", "b=1,c=2"]) == {
        "a": ["x", "y"],
        "b": "1",
        "c": "2",
    }


def test_word_ending_in_comma_does_not_swallow_the_next() -> None:
    # Joined with "," this would read as filename="a,b=2".
    assert parse_keyval_words(["filename=a,", "b=2"]) == {"filename": "a", "b": "2"}


def test_words_implied_key_applies_to_first_word_only() -> None:
    assert parse_keyval_words(["cd", "id=x"], "driver") == {"driver": "cd", "id": "x"}
    with pytest.raises(KeyvalError, match="Expected '=' after parameter 'x'"):
        parse_keyval_words(["id=y", "x"], "driver")


def test_option_keyval() -> None:
    assert parse_option("file,filename=x", "driver") == (
        {"driver": "file", "filename": "x"},
        True,
    )


def test_option_json_keeps_types() -> None:
    text = '{"driver": "null-co", "size": 512, "read-zeroes": true}'
    assert parse_option(text, "driver") == (
        {"driver": "null-co", "size": 512, "read-zeroes": True},
        False,
    )


def test_option_bad_json() -> None:
    with pytest.raises(KeyvalError, match=r"^JSON parse error: Expecting"):
        parse_option('{"driver": ')


def test_option_empty_json_object() -> None:
    assert parse_option("{}", "driver") == ({}, False)


def test_option_only_a_leading_brace_means_json() -> None:
    with pytest.raises(KeyvalError, match=r"^Invalid parameter ' {}'$"):
        parse_option(" {}=x")


def test_qemu_opts_chardev_forms() -> None:
    assert parse_qemu_opts("socket,id=c,path=/a,,b,server,nowait", "backend") == {
        "backend": "socket",
        "id": "c",
        "path": "/a,b",
        "server": "on",
        "wait": "off",
    }


def test_qemu_opts_without_implied_key_bare_is_on() -> None:
    assert parse_qemu_opts("server,id=x") == {"server": "on", "id": "x"}


def test_qemu_opts_empty_name() -> None:
    with pytest.raises(KeyvalError, match=r"^Invalid parameter ''$"):
        parse_qemu_opts("socket,=x", "backend")
