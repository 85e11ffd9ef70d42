"""The training-method registry: the one place that knows which fine-tuning methods exist.

A method is a :class:`Method`: its LightningModule (by import path, so reading the registry never
imports torch), its display name, the metric prefixes it logs beyond the shared ``train/*``,
``val/*`` and ``align/*``, what its adapter export writes, and the base it quantises by default.
Everything outside a method's own module (database, run logger, alignment monitor, ``compare``,
``report``, ``bench train``) asks this registry, or the method name a run recorded in the
database, and never compares method names itself.

The built-in methods are the entries below. Another method registers itself in its own module
(or a test file) with the decorator, which also sets the class's ``method_name``::

    from fteval.methods import register_method
    from fteval.models.qlora import QLoRAModule

    @register_method("toy", display_name="Toy LoRA", metric_prefixes=("toy/",))
    class ToyModule(QLoRAModule):
        ...

and is then trained with ``class_path: <its module>.ToyModule`` in a config like the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Method", "MethodError", "REGISTRY", "display_name", "get_method", "method_names", "method_of",
           "order_key", "register", "register_method", "unregister"]


class MethodError(ValueError):
    """An unknown or conflicting method name (a user error: the message names the fix)."""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name: the key: the ``experiments.method`` value of its runs, the adapter label ``fteval test``
            gives it by default, the prefix of its ``bench train`` ratios. Lower case, no spaces.
        display_name: how tables, charts and the report name it.
        class_path: ``package.module.Class`` of its LightningModule (imported only by :meth:`module_class`).
        quantises_base: whether its default base is 4-bit (its module's ``quantization`` default).
        metric_prefixes: per-step metric names it logs beyond the shared ones (e.g. ``grit/``).
        adapter_files: files its export writes beside the PEFT adapter
            (``adapter_config.json`` + ``adapter_model.safetensors``).
        kfac_callbacks: its fit needs the K-FAC callbacks (``callbacks.kfac.KFACPreconditioner``,
            ``callbacks.reprojection.NeuralReprojection``); ``bench train`` adds them and
            reports the amortised cost of their periodic work.
        config: the training config that runs it on the embedded model.
        description: one line for tables and ``--help`` texts.
    """

    name: str
    display_name: str
    class_path: str
    quantises_base: bool = True
    metric_prefixes: tuple[str, ...] = ()
    adapter_files: tuple[str, ...] = ()
    kfac_callbacks: bool = False
    config: Optional[str] = None
    description: str = ""
    _cls: Any = field(default=None, repr=False, compare=False)

    def module_class(self) -> type:
        """The LightningModule class (imported on first use)."""
        if self._cls is not None:
            return self._cls
        module, _, cls = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), cls)


# name -> Method, in registration order (tables and charts list methods in this order).
REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method``; a second method of the same name is an error unless ``replace``."""
    name = method.name
    if not name or name != name.strip().lower() or " " in name or "#" in name:
        raise MethodError(f"method name {name!r} must be non-empty lower case without spaces or '#'")
    if name in ("baseline", "plain"):
        raise MethodError(f"method name {name!r} is reserved (the untuned model / bench's plain loop); pick another")
    old = REGISTRY.get(name)
    if old is not None and not replace and old.class_path != method.class_path:
        raise MethodError(f"method {name!r} is already registered ({old.class_path}); pick another name")
    REGISTRY[name] = method
    return method


def register_method(name: str, *, display_name: Optional[str] = None, quantises_base: Optional[bool] = None,
                    metric_prefixes: tuple[str, ...] = (), adapter_files: tuple[str, ...] = (),
                    kfac_callbacks: bool = False, config: Optional[str] = None,
                    description: str = "") -> Callable[[type], type]:
    """Class decorator: register a LightningModule as method ``name`` and set its ``method_name``.

    ``quantises_base`` defaults to the class's ``quantization`` default not being ``'none'``.
    """

    def decorate(cls: type) -> type:
        q = quantises_base
        if q is None:
            import inspect

            default = inspect.signature(cls.__init__).parameters.get("quantization")
            q = default is None or default.default != "none"
        register(Method(name=name, display_name=display_name or name, class_path=f"{cls.__module__}.{cls.__qualname__}",
                        quantises_base=q, metric_prefixes=tuple(metric_prefixes), adapter_files=tuple(adapter_files),
                        kfac_callbacks=kfac_callbacks, config=config, description=description, _cls=cls),
                 replace=True)
        cls.method_name = name
        return cls

    return decorate


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    REGISTRY.pop(name, None)


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(REGISTRY)


def get_method(name: str) -> Method:
    """The method called ``name`` (case-insensitive); :class:`MethodError` naming the known ones otherwise."""
    found = REGISTRY.get(str(name).lower())
    if found is None:
        raise MethodError(f"unknown method {name!r}; registered methods are {', '.join(REGISTRY)} "
                          "(a new one registers with fteval.methods.register_method)")
    return found


def display_name(name: str) -> str:
    """The method's display name, or ``name`` itself for a run of an unregistered method."""
    found = REGISTRY.get(str(name).lower())
    return found.display_name if found is not None else str(name)


def method_of(module: Any) -> Optional[Method]:
    """The registered method of a LightningModule instance or class (by its ``method_name``), else None."""
    return REGISTRY.get(str(getattr(module, "method_name", "") or "").lower())


def order_key(name: str) -> tuple[int, str]:
    """Sort key: registered methods in registration order, then the others by name."""
    names = list(REGISTRY)
    return (names.index(name), name) if name in REGISTRY else (len(names), name)


# ---------------------------------------------------------------------------------------------- built-in methods
QLORA = register(Method(
    "qlora", "QLoRA", "fteval.models.qlora.QLoRAModule", quantises_base=True, config="configs/qlora.yaml",
    description="peft LoRA on a 4-bit NF4 base (Dettmers et al. 2023)"))
GRIT = register(Method(
    "grit", "GRIT", "fteval.models.grit.GRITModule", quantises_base=True, metric_prefixes=("grit/",),
    adapter_files=("kfac_factors.safetensors", "effective_rank.json"), kfac_callbacks=True,
    config="configs/grit.yaml",
    description="LoRA with K-FAC natural gradients and Fisher-guided reprojection (arXiv 2601.00231)"))
QDORA = register(Method(
    "qdora", "QDoRA", "fteval.models.qdora.QDoRAModule", quantises_base=True, config="configs/qdora.yaml",
    description="peft DoRA (weight-decomposed LoRA, Liu et al. 2024) on a 4-bit NF4 base"))
LORA = register(Method(
    "lora", "LoRA", "fteval.models.lora.LoRAModule", quantises_base=False, config="configs/lora.yaml",
    description="peft LoRA on a full-precision (bf16 on GPU, fp32 on CPU) base, no quantisation"))
