"""QEMU's option syntaxes: ``key=value,...`` (keyval), its JSON alternative, and QemuOpts.

qemu-storage-daemon reads ``--blockdev``, ``--export``, ``--monitor`` and ``--nbd-server``
in QEMU's *keyval* syntax, and blockd reads the same options the same way so that QSD
command lines work unchanged.  The grammar, as QEMU defines it::

    key-vals     = [ key-val { ',' key-val } [ ',' ] ]
    key-val      = key '=' val
    key          = key-fragment { '.' key-fragment }
    key-fragment = qapi-name | index          (index only after the first fragment)
    qapi-name    = [ '__' rfqdn '_' ] letter { letter | digit | '-' | '_' }
    index        = digit { digit }
    val          = { any character but ',' | ',,' }     (',,' stands for one ',')

Meaning, by translation to JSON:

- the result is an object; ``a.b.c=v`` makes ``{"a": {"b": {"c": "v"}}}``;
- an object whose members are all numeric becomes an array: ``a.0=x,a.1=y`` gives
  ``{"a": ["x", "y"]}``; the indexes may come in any order but must not leave gaps;
- every leaf is a *string*: keyval cannot say "number" or "true".  Whoever consumes the
  result coerces strings to the types its schema declares (QEMU's keyval input visitor);
- the last of several assignments to one leaf wins; using one key both as a leaf and as
  an inner node is an error ("Parameters 'a.*' used inconsistently");
- with an *implied key* (``driver`` for ``--blockdev``), the first element may be a bare
  value: ``file,filename=x`` means ``driver=file,filename=x``.  A bare value ends at the
  first ``,`` or ``=`` and knows no ``,,`` escape.

Errors raise :class:`KeyvalError` with QEMU's texts ("Expected '=' after parameter 'x'",
"Invalid parameter 'x'", "Parameter 'a.0' missing", ...).

If an option's text starts with ``{`` it is JSON instead (QSD accepts that for the same
options); :func:`parse_option` chooses between the two.  :func:`parse_qemu_opts` reads the
older, flat QemuOpts syntax that QSD still uses for ``--chardev``, where a bare ``name``
means ``name=on``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

__all__ = [
    "KeyvalError",
    "parse_keyval",
    "parse_keyval_words",
    "parse_option",
    "parse_qemu_opts",
]

# A QAPI name, optionally with a downstream "__RFQDN_" prefix (QEMU's parse_qapi_name).
_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")
_INDEX = re.compile(r"[0-9]+")
# QEMU stores a key fragment in a 128-byte buffer: at most 127 characters.
_MAX_FRAGMENT = 127
# QEMU caps list indexes at INT_MAX.
_INT_MAX = 2**31 - 1


class KeyvalError(ValueError):
    """The option text is not valid keyval (or JSON) syntax; the message is QEMU's."""


# A tree under construction: inner nodes are dicts (lists are made at the end), leaves str.
_Tree = dict[str, object]


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, object]:
    """Parse ``key=value,...`` into nested dicts and lists whose leaves are strings.

    ``implied_key`` names the key a leading bare value stands for (``"driver"`` for
    ``--blockdev``); ``None`` means every element needs ``key=``.

    :raise KeyvalError: on a syntax error or on inconsistent keys, with QEMU's message.
    """
    return parse_keyval_words([text], implied_key)


def parse_keyval_words(words: Sequence[str], implied_key: str | None = None) -> dict[str, object]:
    """Parse several keyval strings as one, as if joined by commas.

    For command-line tools that take ``key=value`` as separate words: ``["a.0=x",
    "a.1=y"]`` gives ``{"a": ["x", "y"]}``.  Unlike joining the words with ``,``, a word
    that ends in a comma cannot swallow the next one.  ``implied_key`` applies to the
    first element of the first word only.

    :raise KeyvalError: as :func:`parse_keyval`.
    """
    root: _Tree = {}
    first = True
    for text in words:
        pos = 0
        while pos < len(text):
            pos = _parse_one(root, text, pos, implied_key if first else None)
            first = False
    _listify(root, "")
    return root


def parse_option(text: str, implied_key: str | None = None) -> tuple[dict[str, object], bool]:
    """Parse an option value that is either keyval or (if it starts with ``{``) JSON.

    Returns the arguments and whether they came from keyval.  ``True`` means every leaf is
    a string that the schema must coerce (``"on"`` to ``True``, ``"1024"`` to ``1024``);
    ``False`` means the values already have their JSON types.

    :raise KeyvalError: on a keyval syntax error or malformed JSON.
    """
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyvalError(
                f"JSON parse error: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        assert isinstance(value, dict)  # JSON text starting with "{" is an object
        return value, False
    return parse_keyval(text, implied_key), True


def parse_qemu_opts(text: str, implied_key: str | None = None) -> dict[str, str]:
    """Parse QEMU's flat QemuOpts syntax (``socket,id=c0,path=x,server,nowait``).

    Unlike keyval there is no nesting; a bare ``name`` means ``name=on`` and a bare
    ``noname`` means ``name=off`` (QEMU's deprecated but still common short forms), except
    that a leading bare value is the ``implied_key``'s value when one is given.  ``,,``
    stands for one comma in names and values alike.  The last assignment to a name wins.

    :raise KeyvalError: for an empty parameter name.
    """
    result: dict[str, str] = {}
    pos = 0
    first = True
    while pos < len(text):
        name, pos, saw_equals = _read_escaped(text, pos, stop_at_equals=True)
        if saw_equals:
            value, pos, _ = _read_escaped(text, pos, stop_at_equals=False)
        elif first and implied_key is not None:
            name, value = implied_key, name
        elif name.startswith("no") and len(name) > 2:
            name, value = name[2:], "off"
        else:
            value = "on"
        if not name:
            raise KeyvalError("Invalid parameter ''")
        result[name] = value
        first = False
    return result


def _read_escaped(text: str, pos: int, *, stop_at_equals: bool) -> tuple[str, int, bool]:
    """Read up to an unescaped ``,`` (or ``=``); return the text, the next position, and
    whether it stopped at ``=``.  The delimiter itself is consumed."""
    out: list[str] = []
    while pos < len(text):
        char = text[pos]
        if stop_at_equals and char == "=":
            return "".join(out), pos + 1, True
        if char == ",":
            if text.startswith(",,", pos):
                out.append(",")
                pos += 2
                continue
            return "".join(out), pos + 1, False
        out.append(char)
        pos += 1
    return "".join(out), pos, False


def _parse_one(root: _Tree, text: str, start: int, implied_key: str | None) -> int:
    """Parse the element at ``text[start:]`` into ``root``; return where the next begins."""
    key_len = len(text) - start
    for delim in "=,":
        found = text.find(delim, start)
        if found != -1:
            key_len = min(key_len, found - start)
    key_end = start + key_len

    bare = key_len > 0 and (key_end == len(text) or text[key_end] == ",")
    if implied_key is not None and bare:
        # Desugar "value" into "implied_key=value".  The bare value has no ",," escape.
        _put_leaf(root, implied_key.split("."), text[start:key_end], implied_key)
        return key_end + 1 if key_end < len(text) else key_end

    key = text[start:key_end]
    fragments = _split_key(key)

    pos = key_end
    if pos >= len(text) or text[pos] != "=":
        raise KeyvalError(f"Expected '=' after parameter '{key}'")
    pos += 1

    value: list[str] = []
    while pos < len(text):
        char = text[pos]
        if char == ",":
            if text.startswith(",,", pos):
                value.append(",")
                pos += 2
                continue
            pos += 1
            break
        value.append(char)
        pos += 1
    _put_leaf(root, fragments, "".join(value), key)
    return pos


def _split_key(key: str) -> list[str]:
    """Split a dotted key into validated fragments, or raise QEMU's error for it."""
    fragments: list[str] = []
    pos = 0
    while True:
        numeric = bool(fragments) and _INDEX.match(key, pos) is not None
        pattern = _INDEX if numeric else _QAPI_NAME
        match = pattern.match(key, pos)
        length = match.end() - pos if match else 0
        after = pos + length
        if not length or (after < len(key) and key[after] != "."):
            raise KeyvalError(f"Invalid parameter '{key}'")
        if length > _MAX_FRAGMENT:
            whole = pos == 0 and after == len(key)
            kind = "Parameter" if whole else "Parameter fragment"
            raise KeyvalError(f"{kind} '{key[pos:after]}' is too long")
        fragments.append(key[pos:after])
        if after == len(key):
            return fragments
        pos = after + 1


def _put_leaf(root: _Tree, fragments: list[str], value: str, key: str) -> None:
    """Store ``value`` at the path ``fragments``, creating inner dicts as needed."""
    node = root
    prefix_len = 0
    for fragment in fragments[:-1]:
        prefix_len += len(fragment)
        child = node.setdefault(fragment, {})
        if not isinstance(child, dict):
            raise KeyvalError(f"Parameters '{key[:prefix_len]}.*' used inconsistently")
        node = child
        prefix_len += 1
    last = fragments[-1]
    if isinstance(node.get(last), dict):
        raise KeyvalError(f"Parameters '{key}.*' used inconsistently")
    node[last] = value


def _index_of(key: str) -> int | None:
    """The list index a key denotes (capped like QEMU's), or None for a member name."""
    if not key.isascii() or not key.isdigit():
        return None
    return min(int(key), _INT_MAX)


def _listify(node: _Tree, path: str) -> object:
    """Turn dicts whose keys are all indexes into lists, bottom up; return the result.

    ``path`` is the dotted prefix of ``node`` including its trailing dot, for messages.
    """
    has_index = has_member = False
    for key, child in list(node.items()):
        if _index_of(key) is None:
            has_member = True
        else:
            has_index = True
        if isinstance(child, dict):
            node[key] = _listify(child, f"{path}{key}.")
    if has_index and has_member:
        raise KeyvalError(f"Parameters '{path}*' used inconsistently")
    if not has_index:
        return node
    by_index: dict[int, object] = {}
    for key, child in node.items():
        index = _index_of(key)
        assert index is not None
        by_index[index] = child
    items: list[object] = []
    for i in range(min(len(node) + 1, max(by_index) + 1)):
        if i not in by_index:
            raise KeyvalError(f"Parameter '{path}{i}' missing")
        items.append(by_index[i])
    return items
