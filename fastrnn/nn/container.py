"""Containers: Sequential (chains forward, reverses backward) and ModuleList."""

from collections import OrderedDict

from fastrnn.modules.module import Module

__all__ = ["Sequential", "ModuleList"]


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
        setattr(self, str(len(self._modules)), module)
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
                setattr(self, name, m)
        else:
            for m in modules:
                self.append(m)

    def __getitem__(self, idx):
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            return Sequential(*mods[idx])
        return mods[idx]

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def backward(self, dout):
        for m in reversed(list(self._modules.values())):
            dout = m.backward(dout)
        return dout
