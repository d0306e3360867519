"""Params overlays: a small YAML file holding only the keys that differ from params.yaml.

    lmforge params use examples/lm_instruct.yaml   # params.yaml := params.yaml + overlay, validated
    lmforge params show                            # the resolved params, defaults filled in

Merge rule (:func:`apply_overlay`): a mapping merges into params.yaml's mapping key by key, at any
depth; any other value (a scalar, a list, null) replaces params.yaml's. A mapping tagged
``!replace`` replaces params.yaml's whole instead of merging into it: for the maps keyed by metric
name (``gate.floors``, ``gate.tolerances``) when another task scores other metrics.

:func:`use_overlay` validates the merged params with the schema before it writes anything, so a bad
overlay leaves params.yaml as it was. The new params.yaml keeps params.yaml's comments; a key the
overlay sets takes the overlay's end-of-line comment where it has one.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

from lmforge.common import UserError
from lmforge.params import PARAMS_FILE, Params, parse_params

REPLACE_TAG = "!replace"


class Replace(dict):
    """A mapping that replaces the base's value whole instead of merging into it (``!replace``)."""


class _Loader(yaml.SafeLoader):
    """yaml.safe_load plus the ``!replace`` tag."""


def _construct_replace(loader: _Loader, node: yaml.Node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"{REPLACE_TAG} goes on a mapping", node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


_Loader.add_constructor(REPLACE_TAG, _construct_replace)


def _plain(value: Any) -> Any:
    """A deep copy of plain dicts and lists: no Replace marker outlives the merge."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def apply_overlay(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay`` merged in, as a new dict (neither argument changes).

    A mapping merges into the base's mapping key by key, recursively; any other value (a list, a
    scalar, null) replaces the base's, and so does a :class:`Replace` mapping (``!replace``).
    """
    merged = _plain(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and not isinstance(value, Replace) and isinstance(merged.get(key), dict):
            merged[key] = apply_overlay(merged[key], value)
        else:
            merged[key] = _plain(value)
    return merged


def settings(overlay: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """What an overlay sets, by key path: a mapping it merges is walked into; anything else (a
    ``!replace`` mapping too) is one setting."""
    found: dict[tuple[str, ...], Any] = {}
    for key, value in overlay.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and value and not isinstance(value, Replace):
            found.update(settings(value, path))
        else:
            found[path] = value
    return found


def lookup(tree: Any, path: tuple[str, ...], missing: Any = None) -> Any:
    """The value at ``path`` in nested mappings, or ``missing``."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return missing
        tree = tree[key]
    return tree


def load_overlay(path: Path) -> dict:
    """Read an overlay file: a mapping of params sections (``!replace`` tags kept as Replace)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader, plus !replace
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of params sections, got {type(raw).__name__}")
    return raw


def use_overlay(overlay_path: Path, params_path: Path = PARAMS_FILE) -> Params:
    """Merge the overlay into params.yaml, validate the result and write it; return the params.

    A problem (an unknown key, a bad value, settings that do not fit the task) raises UserError
    naming the overlay and each key path, and params.yaml stays byte for byte as it was.
    """
    overlay_path, params_path = Path(overlay_path), Path(params_path)
    if not params_path.is_file():
        raise UserError(f"{params_path}: not found (run from the repo root)")
    base_text = params_path.read_text()
    try:
        base = yaml.safe_load(base_text)
    except yaml.YAMLError as err:
        raise UserError(f"{params_path}: not valid YAML: {err}") from None
    if not isinstance(base, dict):
        raise UserError(f"{params_path}: expected a mapping of sections, got {type(base).__name__}")
    overlay = load_overlay(overlay_path)
    merged = apply_overlay(base, overlay)
    params = parse_params(merged, f"{overlay_path} (applied to {params_path})")
    _write_atomic(params_path, render(base_text, overlay_path.read_text(), merged))
    return params


def _write_atomic(path: Path, text: str) -> None:
    """Write aside and rename over ``path``: a crash mid-write never leaves half a params.yaml."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render(base_text: str, overlay_text: str, merged: dict) -> str:
    """The text of the merged params: params.yaml's own text and comments with the overlay's values
    put in (ruamel.yaml's round trip). Should that text not read back as ``merged`` (a YAML 1.1/1.2
    difference between the two libraries, say), plain YAML without comments instead."""
    from ruamel.yaml import YAMLError

    try:
        text = _round_trip(base_text, overlay_text)
        if yaml.safe_load(text) == merged:
            return text
        why = "the commented text did not read back as the merged params"
    except YAMLError as err:
        why = str(err).splitlines()[0]
    warnings.warn(f"params.yaml written without its comments: {why}", stacklevel=3)
    return yaml.safe_dump(merged, sort_keys=False, allow_unicode=True)


# --- the round trip: ruamel.yaml keeps comments as tokens on the mapping that holds a key -------------
# A key's end-of-line comment is the first line of its token; the blank lines and whole-line comments
# that follow a key are the rest of the token of the last key above them (the deepest one, when the
# key holds a block mapping). The helpers below move that rest along when a value is replaced.


def _yaml():
    from ruamel.yaml import YAML

    rt = YAML()  # round trip: comments, key order, quoting and flow style kept
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _round_trip(base_text: str, overlay_text: str) -> str:
    rt = _yaml()
    base, overlay = rt.load(base_text), rt.load(overlay_text)
    if overlay:
        _merge(base, overlay)
    out = io.StringIO()
    rt.dump(base, out)
    return out.getvalue()


def _is_block_map(value: Any) -> bool:
    from ruamel.yaml.comments import CommentedMap

    return isinstance(value, CommentedMap) and len(value) > 0 and not value.fa.flow_style()


def _is_replace(value: Any) -> bool:
    from ruamel.yaml.comments import CommentedMap

    return isinstance(value, CommentedMap) and value.tag.value == REPLACE_TAG


def _token(node: Any, key: Any) -> Any:
    entry = node.ca.items.get(key)
    return entry[2] if entry and len(entry) > 2 else None


def _last(node: Any) -> tuple[Any, Any]:
    """(mapping, key) whose token ends the text of block mapping ``node``."""
    key = list(node)[-1]
    return _last(node[key]) if _is_block_map(node[key]) else (node, key)


def _split(value: str) -> tuple[str, str]:
    """A token's text: (the end of its own line, whatever follows)."""
    head, newline, rest = value.partition("\n")
    return head + newline, rest


def _pop_tail(node: Any, key: Any) -> str:
    """Remove and return the text that follows ``node[key]`` (blank lines, whole-line comments)."""
    holder, k = _last(node[key]) if _is_block_map(node[key]) else (node, key)
    token = _token(holder, k)
    if token is None:
        return ""
    token.value, rest = _split(token.value)
    return rest


def _set_tail(node: Any, key: Any, tail: str) -> None:
    if not tail:
        return
    holder, k = _last(node[key]) if _is_block_map(node[key]) else (node, key)
    if _token(holder, k) is None:
        _set_eol(holder, k, None)
    token = _token(holder, k)
    token.value = _split(token.value)[0] + tail


def _set_eol(node: Any, key: Any, comment: str | None, column: int | None = None) -> None:
    """Give ``node[key]`` the end-of-line ``comment`` (None: an empty token to hang a tail on) at
    ``column`` (None: where its comment was, or in line with the comments around it)."""
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    token = _token(node, key)
    if column is None and token is not None:
        column = token.start_mark.column
    if column is None:
        tokens = [t for t in (_token(node, k) for k in node) if t is not None and t.value.startswith("#")]
        column = max((t.start_mark.column for t in tokens), default=0)
    rest = _split(token.value)[1] if token is not None else ""
    node.ca.items.setdefault(key, [None, None, None, None])[2] = CommentToken(
        (comment or "\n") + rest, CommentMark(column))


def _clean(value: Any) -> Any:
    """An overlay value ready to go into params.yaml: no ``!replace`` tag, no comments but each
    key's end-of-line one (the overlay's whole-line comments and blank lines describe the overlay)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.tag import Tag

    if isinstance(value, CommentedMap):
        value.yaml_set_ctag(Tag())
        value.ca.comment = None  # a key's comment is on the mapping above (where params.yaml has it)
        for key in value:
            token = _token(value, key)
            value.ca.items.pop(key, None)
            if token is not None and token.value.startswith("#"):
                token.value = _split(token.value)[0]
                value.ca.items[key] = [None, None, token, None]
            value[key] = _clean(value[key])
    elif isinstance(value, CommentedSeq):
        value.ca.comment = None
        value.ca.items.clear()
        for i, item in enumerate(value):
            value[i] = _clean(item)
    return value


def _merge(base: Any, overlay: Any) -> None:
    """apply_overlay on ruamel.yaml's round-trip nodes, in place, moving comments along."""
    from ruamel.yaml.comments import CommentedMap

    tail = _pop_tail(base, list(base)[-1]) if base else ""
    for key, value in overlay.items():
        old = base.get(key)
        if isinstance(value, CommentedMap) and not _is_replace(value) and isinstance(old, CommentedMap):
            _merge(old, value)
            continue
        token = _token(overlay, key)  # the overlay's comment on the key, if any, comes along
        comment = _split(token.value)[0] if token is not None and token.value.startswith("#") else None
        column = token.start_mark.column if comment else None
        if key not in base:
            base[key] = _clean(value)
            if comment:
                _set_eol(base, key, comment, column)
            continue
        after = _pop_tail(base, key)
        base[key] = _clean(value)  # the key keeps params.yaml's comment unless the overlay has one
        if comment:
            _set_eol(base, key, comment, column)
        _set_tail(base, key, after)
    if base:
        _set_tail(base, list(base)[-1], tail)
