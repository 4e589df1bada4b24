"""Containers: Sequential (chains forward, reverses backward) and ModuleList."""

from collections import OrderedDict

from fastrnn.modules.module import Module

__all__ = ["Sequential", "ModuleList"]


def _check_no_repeats(root):
    """One module object twice in a training-mode chain would keep only its second
    forward's cache, and its first call's weight gradient would come out wrong
    (found by an audit): refuse it before anything runs. The chain is what the
    Sequential calls: its children, and the children of nested Sequentials (a
    block of the user's may hold one child under two names and call it once)."""
    seen = set()
    stack = [root]
    while stack:
        for name, child in stack.pop().named_children():
            if id(child) in seen:
                raise ValueError(
                    f"Sequential: module {name!r} ({type(child).__name__}) appears twice in "
                    f"a training-mode chain; each module keeps one forward's cache for its "
                    f"backward, so use two modules (they may share Parameters)")
            seen.add(id(child))
            if isinstance(child, Sequential):
                stack.append(child)


class ModuleList(Module):
    """An indexable list of modules, registered as children "0", "1", ...
    (so parameter names match torch.nn.ModuleList)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__} holds Modules, got {type(module).__name__}")
        k = len(self._modules)
        while str(k) in self._modules:   # a slice keeps its names: never replace one
            k += 1
        setattr(self, str(k), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            return type(self)(mods[idx])
        return mods[idx]


class Sequential(ModuleList):
    """``Sequential(a, b, c)``: forward is c(b(a(x))), backward runs
    c.backward, b.backward, a.backward and returns the input gradient.

    Accepts modules positionally or one OrderedDict name -> module (names then
    prefix the parameters, as in torch).
    """

    def __init__(self, *modules):
        Module.__init__(self)
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            for name, m in modules[0].items():
                if not isinstance(m, Module):
                    raise TypeError(f"Sequential holds Modules, got {type(m).__name__}")
                self._check_name(name)
                setattr(self, name, m)
        else:
            for m in modules:
                self.append(m)

    def _check_name(self, name):
        """A child's name must not shadow an attribute (forward, training, ...) nor make
        parameter names ambiguous ('a.b', ''): KeyError, as torch's add_module."""
        if not isinstance(name, str):
            raise TypeError(f"Sequential: module names must be strings, got {name!r}")
        if not name or "." in name:
            raise KeyError(f"Sequential: module name {name!r} must be non-empty and contain "
                           f"no '.'")
        if name in self._modules or hasattr(self, name):
            raise KeyError(f"Sequential: module name {name!r} is taken (an attribute or "
                           f"another module of this Sequential)")

    def __getitem__(self, idx):
        items = list(self._modules.items())
        if isinstance(idx, slice):   # names kept, as torch: state dict keys stay the same
            return Sequential(OrderedDict(items[idx]))
        return items[idx][1]

    def forward(self, x):
        if self.training:
            _check_no_repeats(self)
        mods = list(self._modules.items())
        for i, (name, m) in enumerate(mods):
            x = m(x)
            if isinstance(x, tuple) and i + 1 < len(mods):
                raise TypeError(
                    f"Sequential: module {name!r} ({type(m).__name__}) returned a tuple (a "
                    f"recurrent layer's (output, state)); wrap it as fastrnn.Recurrent(layer) "
                    f"to pass on its output alone")
        return x

    def backward(self, dout):
        for m in reversed(list(self._modules.values())):
            dout = m.backward(dout)
        return dout
