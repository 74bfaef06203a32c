"""Forward passes with nnsight: the only module that traces the model.

A pass is made in three steps, each its own function:

1. :func:`plan` — what the pass reads, watches, edits and freezes, validated and in canonical site
   names (:mod:`selfrepair.models.sites`), as a :class:`Plan`;
2. :func:`trace` — one traced forward carrying out a plan; it brings back one dict of named,
   saved values (never a positional list);
3. :func:`pack` — those values as a :class:`Pass`.

:func:`run` does all three: a clean pass that reads activations, a patched pass that replaces
head outputs (``z`` slices), whole layer writes or a block's attention input, a resumed pass that
skips the blocks before the first edited layer by replaying the clean run's block outputs
(nnsight ``skip``). :func:`gradients` is the one pass with a backward: the gradient of a scalar
read off the final norm with respect to every layer's ``z`` (nnsight's ``with loss.backward():``
/ ``.grad``).

Remote execution (``load_model(..., remote=True | "local")``, :mod:`selfrepair.remote`): the
same trace runs through nnsight's remote path (NDIF, or its in-process simulation ``"local"``,
which serializes and deserializes the block with local modules hidden), one request per trace,
or as one of the traces of a session (:func:`selfrepair.remote.in_session`, one request for
many). Everything a trace computes reaches the caller only as a saved value: ``watch`` callbacks
and ``final`` reductions *return* what they reduce (per-token scalars, selected rows), which is
saved and brought back instead of the activations. The library's own functions travel by value
(``nnsight.register(selfrepair)``).

Under a ``device_map`` (layers on several GPUs) every value read comes back to the model's
device (:attr:`selfrepair.models.Model.device`, where the callers' tensors live), an edit sees
the value there and its result goes to the device of the module that reads it, and a replayed
residual goes to the device of the block it stands for. On one device these moves are no-ops.

Sites, in the order a block executes them (reads and edits must follow this order): ``attn_in``,
``pattern``, ``z``, ``attn``, ``attn_write``, ``mlp_in``, ``neurons``, ``mlp``, ``mlp_write``,
``block`` — what each is in each family, and how it is read and replaced, is
:mod:`selfrepair.models.sites` (e.g. the pattern: the family's own eager attention on the inputs
of the attention module's ``attention_interface`` call, nnsight ``.source``, with the pass itself
run by the model's own attention implementation, unchanged).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import nnsight
import torch

from .models import Model
from .models import sites
from .models.sites import SITES, canonical, norm_path
from .remote import remote_errors, ship_library

Edit = Callable[[torch.Tensor], torch.Tensor]
Watch = Callable[[str, int, torch.Tensor], Any]  # returns what it reduces (or None)
Final = Callable[[torch.Tensor, torch.Tensor], Any]  # (final resid, final normed) -> reductions


class Replace:
    """An edit whose result does not depend on the value it replaces (a frozen component's clean
    output): ``make()`` builds the replacement when the pass reaches the site. Where the site is a
    whole module's output (:func:`selfrepair.models.sites.skippable`), the module is not run at all
    (nnsight ``skip``) instead of run and overwritten: the same values, without the compute."""

    def __init__(self, make: Callable[[], torch.Tensor]):
        self.make = make

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        return self.make().to(value.dtype)


@dataclass
class Pass:
    """What one traced forward returns."""

    reads: dict[str, torch.Tensor]  # site -> [n_layers_read, batch, pos, ...] stacked by layer
    final_resid: torch.Tensor | None  # input of the final norm [batch, pos, d_model]
    final_normed: torch.Tensor | None  # output of the final norm [batch, pos, d_model]
    embed: torch.Tensor | None  # input of block 0 (token + position embeddings) when read
    last_logits: torch.Tensor | None  # the model's own logits at the last position, when asked
    watched: dict = field(default_factory=dict)  # (site name, layer) -> what ``watch`` returned
    final: Any = None  # what ``final`` returned (then final_resid / final_normed are None)


@dataclass
class Gradients:
    """What :func:`gradients` returns: the clean pass's final norm and ``d metric / d z``."""

    z: torch.Tensor  # [layer, batch, pos, n_heads*d_head], the model's dtype
    final_resid: torch.Tensor  # input of the final norm [batch, pos, d_model]
    final_normed: torch.Tensor  # output of the final norm [batch, pos, d_model]


@dataclass(frozen=True)
class Plan:
    """What one pass reads, watches, edits and freezes: :func:`plan`'s validated answer, every
    site canonical (:func:`selfrepair.models.sites.canonical`)."""

    reads: dict[str, str]  # each name asked for -> the site read
    layers: dict[str, frozenset]  # site -> the only layers read (absent: every layer run)
    watch_as: dict[str, tuple[str, ...]]  # site -> the names ``watch`` is called with
    edits: dict[tuple[str, int], Edit]
    freeze: dict[tuple[str, int], torch.Tensor]  # write site of a sandwich model -> its scale
    freeze_final: torch.Tensor | None
    stop_after: tuple[str, int] | None
    order: tuple[str, ...]  # every site touched, in the order a block runs them
    start_layer: int = 0
    resume: torch.Tensor | None = None
    read_embed: bool = False
    last_logits: bool = False

    @property
    def read(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.reads.values()))


def plan(model: Model, *, read: Iterable[str] = (), edits: dict[tuple[str, int], Edit] | None = None,
         watch_sites: Iterable[str] = (), start_layer: int = 0, resume: torch.Tensor | None = None,
         read_embed: bool = False, last_logits: bool = False,
         read_layers: dict[str, Iterable[int]] | None = None, stop_after: tuple[str, int] | None = None,
         freeze: dict[tuple[str, int], torch.Tensor] | None = None,
         freeze_final: torch.Tensor | None = None) -> Plan:
    """The :class:`Plan` of a pass (the keywords of :func:`run`); every mistake is a ``ValueError``
    here, before anything runs."""
    edits = {(canonical(model, s), l): f for (s, l), f in (edits or {}).items()}
    watch_as: dict[str, tuple[str, ...]] = {}
    for s in watch_sites:
        watch_as[canonical(model, s)] = watch_as.get(canonical(model, s), ()) + (s,)
    freeze = dict(freeze or {})
    if any(s not in ("attn_write", "mlp_write") or not model.sandwich for s, _ in freeze):
        bad = next(s for s, _ in freeze if s not in ("attn_write", "mlp_write") or not model.sandwich)
        raise ValueError(f"cannot freeze site {bad!r}: only the block norms of sandwich models "
                         "(attn_write, mlp_write) and the final norm (freeze_final) have a scale")
    reads = {s: canonical(model, s) for s in read}
    touched = set(reads.values()) | set(watch_as) | {s for s, _ in edits} | {s for s, _ in freeze}
    for s in touched:
        if s not in SITES:
            raise ValueError(f"unknown site {s!r}; sites: {SITES}")
    if any(s in sites.READ_ONLY for s, _ in edits):
        raise ValueError(f"the sites {sites.READ_ONLY} are read only: edit z, attn_in or a write instead")
    if stop_after is not None:
        stop_after = (canonical(model, stop_after[0]), int(stop_after[1]))
        if stop_after[0] not in touched:
            raise ValueError(f"stop_after site {stop_after[0]!r} is neither read, watched nor edited")
    if start_layer and resume is None:
        raise ValueError("start_layer > 0 needs `resume`, the residual entering that block")
    layers = {canonical(model, s): frozenset(ls) for s, ls in (read_layers or {}).items()}
    return Plan(reads, layers, watch_as, edits, freeze, freeze_final, stop_after,
                tuple(sites.order(model, touched)), start_layer, resume, read_embed, last_logits)


def run(model: Model, tokens: torch.Tensor, *, watch: Watch | None = None, final: Final | None = None,
        **how) -> Pass:
    """One traced forward of ``tokens [batch, pos]``: :func:`pack` of :func:`trace` of :func:`plan`.

    Keywords of the plan (``how``):

    read: sites whose values are returned for every layer ``>= start_layer`` (or only the layers
        in ``read_layers[site]``), stacked along a new first dimension in layer order.
    edits: ``{(site, layer): f}``; ``f`` gets the site's value and returns its replacement.
    watch_sites: ``watch(site, layer, value)`` is called for each of these sites (after any edit),
        inside the trace; lets callers reduce large tensors on the fly. What it returns (``None``:
        nothing) is saved as ``Pass.watched[(site, layer)]``; it must not rely on changing
        outside state, which a remote trace would change on the server only.
    start_layer, resume: blocks ``< start_layer`` are not run (nnsight ``skip``); the residual
        stream entering block ``start_layer`` is ``resume [batch, pos, d_model]`` (the clean run's
        output of block ``start_layer - 1``). Earlier skipped blocks pass the same tensor along,
        which nothing reads.
    read_embed: also return the input of block 0 (``Pass.embed``).
    last_logits: also run the unembedding and return the model's own output logits at the last
        position only (``logits_to_keep=1``; after the family's logit scale and soft-capping);
        otherwise the pass stops after the final norm.
    stop_after: ``(site, layer)``: stop the forward right after that site (``tracer.stop()``);
        the returned pass then has only ``reads`` (final tensors are ``None``).
    freeze: ``{(site, layer): scale [batch, pos]}`` for the write sites ``attn_write`` /
        ``mlp_write`` of sandwich models: that block norm divides by ``scale`` instead of its own
        RMS (its output becomes ``g * x / scale`` of its input ``x``, :meth:`Model.frozen_norm`),
        before any edit of the same site. A frozen norm cannot react to an edit upstream of it.
    freeze_final: ``scale [batch, pos]``: the final norm likewise (``n(x) / scale + b``); what
        ``final`` and the logits see is the frozen norm's output.

    ``final(resid, normed)`` of the final norm's input and output is computed inside the trace;
    only its result comes back (``Pass.final``), not the two full tensors.
    """
    p = plan(model, **how)
    return pack(p, trace(model, tokens, p, watch, final))


def _options(model: Model, last_logits: bool, pattern: bool = False) -> dict:
    """The keywords of nnsight's ``trace``: the logits of the last position only, the attention
    probabilities of families whose own attention returns them (when the pattern is read), and
    ``remote=`` for a remote model outside a session (in a session the whole session is the
    request)."""
    kwargs = {"logits_to_keep": 1} if last_logits else {}
    if pattern and model.adapter.pattern == "output":
        kwargs["output_attentions"] = True
    if model.remote and not model.in_session:
        ship_library()
        kwargs["remote"] = model.remote
    return kwargs


def _errors(model: Model):
    """In a session this runs on the server, where nothing is remote (and a decorated function,
    shipped by value from its source, comes without its decorator: no remote_errors there)."""
    return contextlib.nullcontext() if model.in_session else remote_errors(model)


def trace(model: Model, tokens: torch.Tensor, p: Plan, watch: Watch | None = None,
          final: Final | None = None) -> dict:
    """One traced forward carrying out ``p``. Returns the saved values by name: ``reads`` (site ->
    list per layer), ``watched``, and when reached ``embed``, ``final`` (:func:`_final_norm`) and
    ``logits``."""
    options = _options(model, p.last_logits, "pattern" in p.order)
    rows = tuple(tokens.shape[:2])
    with _errors(model), torch.no_grad(), model.nn.trace(tokens, **options) as tracer:
        out = nnsight.save({"reads": {s: [] for s in p.read}, "watched": {}})
        blocks = model.envoy(model.adapter.blocks)
        if p.read_embed:
            out["embed"] = blocks[0].input.to(model.device)
        for layer in range(p.start_layer):
            sites.skip_block(model, layer, p.resume.to(model.block_device(layer)))
        for layer in range(p.start_layer, model.n_layers):
            for site in p.order:
                _visit(model, p, site, layer, rows, watch, out)
                if p.stop_after == (site, layer):
                    tracer.stop()
        out["final"] = _final_norm(model, p, final)
        if p.last_logits:  # what the model returns: after its logit scale and soft-capping
            out["logits"] = model.nn.output.logits[:, -1].to(model.device)
        else:
            tracer.stop()
    return out


def _visit(model: Model, p: Plan, site: str, layer: int, rows: tuple[int, int],
           watch: Watch | None, out: dict) -> None:
    """One site of one block inside a trace (of ``rows = (batch, pos)`` tokens): its value (a
    frozen block norm rebuilt; a :class:`Replace` of a skippable module; otherwise
    :func:`selfrepair.models.sites.get`, which knows each family's form of it), its edit
    (:func:`~selfrepair.models.sites.put`), its read and its watch."""
    home = model.device
    edit = p.edits.get((site, layer))
    skipped = isinstance(edit, Replace) and sites.skippable(model, site) and not _inside(p, site, layer)
    if skipped:  # the module does not run: its output is the replacement
        value = edit.make().to(home)
        sites.skip(model, site, layer, value.to(model.block_device(layer)))
    elif (site, layer) in p.freeze:  # a write site: the block norm's output, rebuilt on `home`
        envoy, _ = sites.envoy(model, site, layer)
        x = envoy.input
        value = model.frozen_norm(model.module(norm_path(model, site), layer), x.to(home),
                                  p.freeze[(site, layer)], kind="rms").to(x.device)
        envoy.output = value
    else:
        value = sites.get(model, site, layer, rows)
    if edit is not None and not skipped:  # the edit works on `home`; its result goes to the reader
        value = edit(value.to(home)).to(value.device)
        sites.put(model, site, layer, value)
    if site in out["reads"] and (site not in p.layers or layer in p.layers[site]):
        out["reads"][site].append(value.to(home))
    if watch is not None:
        for name in p.watch_as.get(site, ()):
            reduced = watch(name, layer, value.to(home))
            if reduced is not None:
                out["watched"][(name, layer)] = reduced


def _inside(p: Plan, site: str, layer: int) -> bool:
    """Whether the pass reads, watches or edits the site inside ``site``'s module at ``layer``."""
    inner = sites.INSIDE.get(site)
    if site == "mlp":  # the neurons' module is visited at every layer once the pass touches them
        return inner in p.order
    read = inner in p.read and (inner not in p.layers or layer in p.layers[inner])
    return read or inner in p.watch_as or (inner, layer) in p.edits


def _final_norm(model: Model, p: Plan, final: Final | None) -> dict:
    """The final norm inside a trace (frozen at ``p.freeze_final`` when given): ``{"value":
    final(resid, normed)}``, or ``{"resid", "normed"}`` when there is no ``final``."""
    norm, home = model.envoy(model.adapter.final_norm), model.device
    if p.freeze_final is not None:
        x = norm.input
        resid = x.to(home)
        normed = model.frozen_norm(model.module(model.adapter.final_norm), resid, p.freeze_final)
        norm.output = normed.to(x.device)
    else:
        resid, normed = norm.input.to(home), norm.output.to(home)
    return {"resid": resid, "normed": normed} if final is None else {"value": final(resid, normed)}


def pack(p: Plan, out: dict) -> Pass:
    """:func:`trace`'s saved values as a :class:`Pass` (reads under the names asked for; the final
    tensors ``None`` when the pass stopped before the final norm)."""
    reads = {name: torch.stack(out["reads"][site]).detach() for name, site in p.reads.items()
             if out["reads"][site]}
    final = out.get("final", {})
    return Pass(reads=reads, final_resid=final.get("resid"), final_normed=final.get("normed"),
                embed=out.get("embed"), last_logits=out.get("logits"), watched=dict(out["watched"]),
                final=final.get("value"))


def gradients(model: Model, tokens: torch.Tensor, metric: Final) -> Gradients:
    """A clean pass of ``tokens`` with one backward: ``metric(resid, normed)`` of the final norm's
    input and output returns a scalar, whose gradient with respect to every layer's ``z`` comes
    back (:attr:`Gradients.z`, in the model's dtype). Autograd is on from the residual entering
    block 0 (made a leaf that requires grad), so gradients flow through every block, norm and
    attention pattern, but never into the weights, which stay ``requires_grad=False``."""
    home = model.device
    with _errors(model), torch.enable_grad(), model.nn.trace(tokens, **_options(model, False)) as tracer:
        out = nnsight.save({})
        blocks = model.envoy(model.adapter.blocks)
        blocks[0].input = blocks[0].input.detach().requires_grad_(True)
        zs = []
        for layer in range(model.n_layers):
            zs.append(sites.get(model, "z", layer, tuple(tokens.shape[:2])))
        norm = model.envoy(model.adapter.final_norm)
        resid, normed = norm.input.to(home), norm.output.to(home)
        value = metric(resid, normed)
        out["resid"], out["normed"] = resid.detach(), normed.detach()
        out["z"] = backward_grads(value, zs, home)
        tracer.stop()
    return Gradients(z=torch.stack(list(out["z"])[::-1]), final_resid=out["resid"],
                     final_normed=out["normed"])


def backward_grads(metric: torch.Tensor, zs: list, home: torch.device) -> list[torch.Tensor]:
    """One backward of ``metric`` inside a trace: the gradient of each of ``zs``, last first
    (gradients arrive in the reverse of the forward order).

    Its own function, not a block nested in :func:`gradients`' trace: nnsight finds a ``with``
    block by its line in the source file, and a trace that went the remote way runs its body
    re-generated from the parsed source, whose lines are not the file's (in the local simulation
    the nested ``with metric.backward():`` was then not found and ran as a bare backward). A
    function runs from its own source (on the server: shipped by value with its lines kept)."""
    out = []
    with metric.backward():
        for z in reversed(zs):
            out.append(z.grad.to(home))
    return out


__all__ = ["Edit", "Final", "Gradients", "Pass", "Plan", "Replace", "SITES", "Watch", "backward_grads",
           "gradients", "pack", "plan", "run", "trace"]
