"""The parts of a restricted unpickler that every pickle sfckpt reads shares.

The pure-Python unpickler (its memo is a dict, where the C one allocates a
table as large as any index the file names) with four changes:

* BUILD, the one opcode that changes an existing object, reaches only objects
  that the subclass's `build()` accepts (objects made for this load, of types it
  names); never a class, module, function or shared object.
* Dictionary keys and set members are checked before they are hashed: hashing
  a nested tuple is recursive, so a 200,000-deep tuple crashes the
  interpreter and shared references make the cost exponential (a hash bomb).
* After loading, the object is walked once, without recursion, counting shared
  references each time they are reached: a billion-laughs structure, a cycle or
  nesting deeper than anything sfckpt will later format, compare or recurse
  into is refused here, while it is still cheap to do so.
* Integers are bounded so that any of them can be turned into a float or text.
"""
from __future__ import annotations

import pickle
import types
from typing import Any, Callable, Iterable

from .. import limits

# Keys of an honest checkpoint are names, indices or small tuples of them.
_MAX_KEY_NODES = 10_000


class GuardError(pickle.UnpicklingError):
    """A limit was reached; carries the limit so the message can say how to raise it."""

    def __init__(self, message: str, limit: limits.Limit | None = None):
        super().__init__(message)
        self.limit = limit


def _int_ok(value: int, int_bits: int) -> None:
    if value.bit_length() > int_bits:
        raise GuardError(f"an integer of {value.bit_length()} bits", limits.INT_BITS)


_SCALARS = (str, bytes, float, bool, type(None))


def check_key(key: Any, expand: Callable[[Any], Iterable[Any] | None] = lambda k: None,
              max_depth: int | None = None, int_bits: int | None = None) -> None:
    """Refuse a dict key or set member that is not cheap to hash.

    Accepted: str, bytes, int, float, bool, None, and tuples or frozensets of
    them, small and shallow; `expand(obj)` may return the fields of other
    types the caller accepts as keys (DCP's MetadataIndex).
    """
    kind = type(key)
    if kind in _SCALARS:  # nearly every key: no walk
        return
    if int_bits is None:
        int_bits = limits.INT_BITS.value
    if kind is int:
        _int_ok(key, int_bits)
        return
    if max_depth is None:
        max_depth = limits.NESTING_DEPTH.value
    stack = [(key, 0)]
    seen = 0
    while stack:
        obj, depth = stack.pop()
        seen += 1
        if seen > _MAX_KEY_NODES or depth > max_depth:
            raise GuardError("a dictionary key or set member that is too large or too deeply nested to hash",
                             limits.NESTING_DEPTH)
        kind = type(obj)
        if kind is int:
            _int_ok(obj, int_bits)
        elif kind in _SCALARS:
            pass
        elif kind in (tuple, frozenset):
            stack.extend((item, depth + 1) for item in obj)
        else:
            fields = expand(obj)
            if fields is None:
                raise pickle.UnpicklingError(f"a dictionary key or set member of type {kind.__name__}")
            stack.extend((item, depth + 1) for item in fields)


_LEAVES = (str, bytes, float, bool, type(None))


def _inside(node: Any, children: Callable[[Any], Iterable[Any] | None]) -> list | None:
    if isinstance(node, dict):
        items = [v for kv in node.items() for v in kv]
        extra = getattr(node, "__dict__", None)  # an OrderedDict's _metadata
        return items + list(extra.values()) if extra else items
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    inside = children(node)
    return None if inside is None else list(inside)


def check_tree(obj: Any, budget: int, children: Callable[[Any], Iterable[Any] | None]) -> None:
    """Refuse `obj` if, written out as a tree (shared references repeated), it would have more than
    `budget` objects, nest deeper than the nesting limit, or contain itself.

    Sizes and depths are computed once per distinct object (post-order, no recursion), so the
    check costs the pickle's honest size even when the tree it describes is exponential.
    `children(o)` gives the objects inside the caller's own types (None for a leaf); dicts,
    lists, tuples, sets and frozensets are handled here.
    """
    max_depth, int_bits = limits.NESTING_DEPTH.value, limits.INT_BITS.value
    done: dict[int, tuple[int, int]] = {}  # id -> (objects in its tree, depth)
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, finished = stack.pop()
        if type(node) is int:
            _int_ok(node, int_bits)
            continue
        if type(node) in _LEAVES:
            continue
        key = id(node)
        inside = _inside(node, children)
        if inside is None:
            continue
        if finished:
            size, depth = 1, 0
            for item in inside:
                s, d = done.get(id(item), (1, -1)) if type(item) not in _LEAVES and type(item) is not int else (1, -1)
                size += s
                depth = max(depth, d + 1)
            if size > budget:
                raise GuardError(f"the object data expands to more than {budget} objects (shared references "
                                 "repeated)", limits.PICKLE_NODES)
            if depth > max_depth:
                raise GuardError(f"the object data is nested more than {max_depth} levels deep", limits.NESTING_DEPTH)
            done[key] = (size, depth)
            active.discard(key)
            continue
        if key in done:
            continue
        if key in active:
            raise GuardError("the object data contains itself")
        active.add(key)
        stack.append((node, True))
        stack.extend((item, False) for item in inside if id(item) not in done)


class GuardedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with BUILD, hashing and sizes under control."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, data_len: int):
        super().__init__(file)
        self.data_len = data_len
        self.max_depth, self.int_bits = limits.NESTING_DEPTH.value, limits.INT_BITS.value

    # -- what subclasses decide ---------------------------------------------------------------
    def build(self, inst: Any, state: Any) -> None:
        """Apply a BUILD opcode's `state` to `inst`, or raise: refuses everything by default."""
        raise pickle.UnpicklingError(f"the pickle sets the state of a {type(inst).__name__}, which is not allowed")

    def key_fields(self, key: Any) -> Iterable[Any] | None:
        """The fields of a key of a type the subclass allows as a dict key (None: not allowed)."""
        return None

    def children(self, obj: Any) -> Iterable[Any] | None:
        """The objects inside `obj`, for types the subclass creates (None: a leaf)."""
        return None

    # -- guarded opcodes (at SETITEMS, ADDITEMS, DICT and FROZENSET the pure-Python unpickler's
    # `stack` holds exactly the items since the MARK: the rest waits in `metastack`) -----------
    def check_keys(self, keys: Iterable[Any]) -> None:
        for key in keys:
            if type(key) not in _SCALARS:
                check_key(key, self.key_fields, self.max_depth, self.int_bits)

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            raise pickle.UnpicklingError(f"the pickle changes {getattr(inst, '__name__', type(inst).__name__)}, "
                                         "a class or function, which is never allowed")
        self.build(inst, state)

    def _load_setitem(self):
        self.check_keys(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)

    def _load_setitems(self):
        self.check_keys(self.stack[::2])
        pickle._Unpickler.load_setitems(self)

    def _load_dict(self):
        self.check_keys(self.stack[::2])
        pickle._Unpickler.load_dict(self)

    def _load_additems(self):
        self.check_keys(self.stack)
        pickle._Unpickler.load_additems(self)

    def _load_frozenset(self):
        self.check_keys(self.stack)
        pickle._Unpickler.load_frozenset(self)

    def _load_long(self, loader):
        loader(self)
        _int_ok(self.stack[-1], self.int_bits)

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.FROZENSET[0]] = _load_frozenset
    for _op, _loader in ((pickle.LONG, pickle._Unpickler.load_long), (pickle.LONG1, pickle._Unpickler.load_long1),
                         (pickle.LONG4, pickle._Unpickler.load_long4)):
        dispatch[_op[0]] = (lambda loader: lambda self: self._load_long(loader))(_loader)
    del _op, _loader

    def load_checked(self) -> Any:
        """`load()`, then the walk that refuses exponential or too deep structures."""
        obj = self.load()
        check_tree(obj, limits.PICKLE_NODES.value + 4 * self.data_len, self.children)
        return obj


def guarded_call(func: Callable, check: Callable[[tuple], None]) -> Callable:
    """`func`, with its arguments checked first (for callables a pickle may REDUCE)."""

    def call(*args):
        check(args)
        return func(*args)

    call.__name__ = getattr(func, "__name__", "call")
    return call
