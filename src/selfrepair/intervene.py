"""Forward passes with nnsight: the only module that traces the model.

One function, :func:`run`, covers every pass the paper needs: a clean pass that reads
activations, a patched pass that replaces head outputs (``z`` slices), whole layer writes or a
block's attention input, and a resumed pass that skips the blocks before the first edited layer
by replaying the clean run's block outputs (nnsight ``skip``), and a clean pass with one
backward (``backward=metric``: the gradient of a scalar read off the final norm with respect to
every layer's ``z``, nnsight's ``with loss.backward():`` / ``.grad``). It returns plain tensors.

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

Sites, in the order a block executes them (reads and edits must follow this order):

=============  ================================================================================
``attn_in``    input of the norm in front of attention: the residual stream as the heads read it
               (editing it changes what the heads see, not the residual stream itself)
``pattern``    the attention probabilities ``[.., n_heads, query, key]`` (read only), computed
               from the inputs of the attention module's ``attention_interface(...)`` call (query
               and key after rotary / q-k norms, the layer's mask, the scaling; nnsight
               ``.source``) by the model family's own eager attention (:func:`eager_pattern`):
               the pass itself runs with the model's attention implementation, unchanged
``z``          input of the attention output projection: ``[.., n_heads * d_head]``, head h is
               the slice ``h*d_head:(h+1)*d_head``
``attn``       output of the attention output projection (the sum of heads plus ``b_O``)
``attn_write`` what the attention writes to the residual (sandwich models: the post-attention
               norm's output; otherwise the same tensor as ``attn``)
``neurons``    input of the MLP down projection (the hidden activations)
``mlp``        output of the MLP
``mlp_write``  what the MLP writes to the residual (sandwich models: post-feedforward norm output)
``block``      output of the block (the residual stream after it)
=============  ================================================================================
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import nnsight
import torch

from .models import Model
from .remote import remote_errors, ship_library

SITES = ("attn_in", "pattern", "z", "attn", "attn_write", "neurons", "mlp", "mlp_write", "block")
Edit = Callable[[torch.Tensor], torch.Tensor]
Watch = Callable[[str, int, torch.Tensor], Any]  # returns what it reduces (or None)
Final = Callable[[torch.Tensor, torch.Tensor], Any]  # (final resid, final normed) -> reductions


@dataclass
class Pass:
    """What one traced forward returns."""

    reads: dict[str, torch.Tensor]  # site -> [n_layers_read, batch, pos, ...] stacked by layer
    final_resid: torch.Tensor  # input of the final norm [batch, pos, d_model]
    final_normed: torch.Tensor  # output of the final norm [batch, pos, d_model]
    embed: torch.Tensor | None  # input of block 0 (token + position embeddings) when read
    last_logits: torch.Tensor | None  # full-vocabulary logits at the last position, when asked
    watched: dict = field(default_factory=dict)  # (site name, layer) -> what ``watch`` returned
    final: Any = None  # what ``final`` returned (then final_resid / final_normed are None)
    grads: dict = field(default_factory=dict)  # "z" -> [layer, batch, pos, n_heads*d_head] d metric / d z


def _site_envoy(model: Model, site: str, layer: int):
    """(envoy, "input" | "output") for a site; ``None`` for write sites of non-sandwich models."""
    a = model.adapter
    if site == "attn_in":
        return model.envoy(a.attn_norm, layer), "input"
    if site == "z":
        return model.envoy(a.attn_out, layer), "input"
    if site == "attn":
        return model.envoy(a.attn_out, layer), "output"
    if site == "pattern":
        return model.envoy(a.attn, layer), "weights"
    if site == "neurons":
        return model.envoy(a.mlp_out, layer), "input"
    if site == "mlp":
        return model.envoy(a.mlp, layer), "output"
    if site == "attn_write":
        return (model.envoy(a.post_attn_norm, layer), "output") if a.post_attn_norm else None
    if site == "mlp_write":
        return (model.envoy(a.post_mlp_norm, layer), "output") if a.post_mlp_norm else None
    if site == "block":
        return model.envoy(a.blocks)[layer], "output"
    raise ValueError(f"unknown site {site!r}; sites: {SITES}")


ATTENTION_CALL = "attention_interface_1"  # the `attention_interface(self, q, k, v, mask, ...)` call


def eager_pattern(args: tuple, kwargs: dict) -> torch.Tensor:
    """The attention probabilities ``[batch, n_heads, query, key]`` of one ``attention_interface``
    call, from its inputs ``(module, query, key, value, mask, ...)``: what the model family's own
    ``eager_attention_forward`` returns (its softmax dtype, GQA key repeat, soft-capping), fed the
    additive float mask eager attention gets (:func:`additive_mask`), without dropout."""
    module, query, key, value, mask = args[:5]
    eager = sys.modules[type(module).__module__].eager_attention_forward
    mask = additive_mask(mask, query.shape[-2], key.shape[-2], query.dtype, query.device)
    return eager(module, query, key, value, mask, *args[5:], **{**kwargs, "dropout": 0.0})[1]


def additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The mask as eager attention adds it: ``0`` where a query may attend, the dtype's minimum
    where not. Under ``sdpa`` Hugging Face passes ``None`` for a purely causal layer (the query
    positions are the last ``q_len`` keys) or a boolean mask (``True``: attend, e.g. a sliding
    window); a float mask is already additive."""
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _pattern(envoy) -> torch.Tensor:
    """The ``pattern`` site's value in a trace: :func:`eager_pattern` of the inputs of the attention
    module's ``attention_interface`` call (nnsight ``.source``, which instruments the module's
    forward the first time; a trace that reads no pattern never touches it)."""
    args, kwargs = getattr(envoy.source, ATTENTION_CALL).inputs
    return eager_pattern(args, kwargs)


def _norm_path(model: Model, site: str) -> str:
    """The block norm whose output is a write site (sandwich models)."""
    return model.adapter.post_attn_norm if site == "attn_write" else model.adapter.post_mlp_norm


def run(model: Model, tokens: torch.Tensor, *, read: Iterable[str] = (),
        edits: dict[tuple[str, int], Edit] | None = None, watch: Watch | None = None,
        watch_sites: Iterable[str] = (), start_layer: int = 0,
        resume: torch.Tensor | None = None, read_embed: bool = False,
        last_logits: bool = False, read_layers: dict[str, Iterable[int]] | None = None,
        stop_after: tuple[str, int] | None = None, final: Final | None = None,
        backward: Final | None = None,
        freeze: dict[tuple[str, int], torch.Tensor] | None = None,
        freeze_final: torch.Tensor | None = None) -> Pass:
    """One traced forward of ``tokens [batch, pos]``.

    Parameters
    ----------
    read: sites whose values are returned for every layer ``>= start_layer`` (or only the layers
        in ``read_layers[site]``), stacked along a new first dimension in layer order.
    edits: ``{(site, layer): f}``; ``f`` gets the site's value and returns its replacement.
    watch: called as ``watch(site, layer, value)`` for each site in ``watch_sites`` (after any
        edit), inside the trace; lets callers reduce large tensors on the fly. What it returns
        (``None``: nothing) is saved as ``Pass.watched[(site, layer)]``; it must not rely on
        changing outside state, which a remote trace would change on the server only.
    start_layer, resume: blocks ``< start_layer`` are not run (nnsight ``skip``); the residual
        stream entering block ``start_layer`` is ``resume [batch, pos, d_model]`` (the clean run's
        output of block ``start_layer - 1``). Earlier skipped blocks pass the same tensor along,
        which nothing reads.
    last_logits: also run the unembedding and return the logits at the last position only
        (``logits_to_keep=1``); otherwise the pass stops after the final norm.
    stop_after: ``(site, layer)``: stop the forward right after that site (``tracer.stop()``);
        the returned pass then has only ``reads`` (final tensors are ``None``).
    final: ``final(resid, normed)`` of the final norm's input and output, computed inside the
        trace; only its result comes back (``Pass.final``), not the two full tensors.
    backward: ``backward(resid, normed)`` of the final norm's input and output returning a
        scalar; the pass then runs with autograd on (from the residual entering the first block
        run, so gradients flow through every block, norm and attention pattern, but never into
        the weights, which stay ``requires_grad=False``) and one backward of that scalar gives
        ``Pass.grads["z"]``, its gradient with respect to every layer's ``z`` (layers
        ``>= start_layer``), in the model's dtype. No edits, stops or ``final`` with it.
    freeze: ``{(site, layer): scale [batch, pos]}`` for the write sites ``attn_write`` /
        ``mlp_write`` of sandwich models: that block norm divides by ``scale`` instead of its own
        RMS (its output becomes ``g * x / scale`` of its input ``x``, :meth:`Model.frozen_norm`),
        before any edit of the same site. A frozen norm cannot react to an edit upstream of it.
    freeze_final: ``scale [batch, pos]``: the final norm likewise (``n(x) / scale + b``); what
        ``final`` and the logits see is the frozen norm's output.
    """
    # Without sandwich norms a block writes the raw attention / MLP output: alias the sites.
    alias = {} if model.sandwich else {"attn_write": "attn", "mlp_write": "mlp"}
    edits = {(alias.get(s, s), l): f for (s, l), f in (edits or {}).items()}
    requested = tuple(read)
    read = tuple(dict.fromkeys(alias.get(s, s) for s in read))
    watch_as: dict[str, list[str]] = {}  # canonical site -> the names the caller asked for
    for s in watch_sites:
        watch_as.setdefault(alias.get(s, s), []).append(s)
    watch_sites = tuple(watch_as)
    freeze = dict(freeze or {})
    for s, _ in freeze:
        if s not in ("attn_write", "mlp_write") or not model.sandwich:
            raise ValueError(f"cannot freeze site {s!r}: only the block norms of sandwich models "
                             "(attn_write, mlp_write) and the final norm (freeze_final) have a scale")
    touched = set(read) | set(watch_sites) | {s for s, _ in edits} | {s for s, _ in freeze}
    for s in touched:
        if s not in SITES:
            raise ValueError(f"unknown site {s!r}; sites: {SITES}")
    if any(s == "pattern" for s, _ in edits):
        raise ValueError("the pattern site is read only: edit z or attn_in instead")
    if stop_after is not None:
        stop_after = (alias.get(stop_after[0], stop_after[0]), int(stop_after[1]))
        if stop_after[0] not in touched:
            raise ValueError(f"stop_after site {stop_after[0]!r} is neither read, watched nor edited")
    if backward is not None and (edits or stop_after is not None or final is not None or last_logits
                                 or freeze or freeze_final is not None):
        raise ValueError("backward= runs a clean pass with one backward: no edits, stop_after, "
                         "final, last_logits or frozen norms with it")
    if start_layer and resume is None:
        raise ValueError("start_layer > 0 needs `resume`, the residual entering that block")
    only = {alias.get(s, s): set(ls) for s, ls in (read_layers or {}).items()}
    order = [s for s in SITES if s in touched]
    n_layers = model.n_layers
    home = model.device
    kwargs = {"logits_to_keep": 1} if last_logits else {}
    if model.remote and not model.in_session:  # in a session the whole session is the request
        ship_library()
        kwargs["remote"] = model.remote
    if backward is not None and "z" not in order:
        order = [s for s in SITES if s in touched | {"z"}]
    # Gradients are with respect to activations only: autograd is on for a backward pass, and the
    # residual entering the first block run is made a leaf that requires grad (weights never do).
    grad_mode = torch.enable_grad() if backward is not None else torch.no_grad()
    # in a session this runs on the server, where nothing is remote (and a decorated function,
    # shipped by value from its source, comes without its decorator: no remote_errors there)
    errors = contextlib.nullcontext() if model.in_session else remote_errors(model)
    with errors, grad_mode, model.nn.trace(tokens, **kwargs) as tracer:
        saved = nnsight.save({s: [] for s in read})
        finals = nnsight.save([])
        watched = nnsight.save({})
        grads = nnsight.save([])
        zs = []
        blocks = model.envoy(model.adapter.blocks)
        if read_embed:
            finals.append(blocks[0].input.to(home))
        for layer in range(start_layer):
            blocks[layer].skip(resume.to(model.block_device(layer)))
        if backward is not None:
            blocks[start_layer].input = blocks[start_layer].input.detach().requires_grad_(True)
        for layer in range(start_layer, n_layers):
            for site in order:
                envoy, slot = _site_envoy(model, site, layer)
                if (site, layer) in freeze:  # a write site: the block norm's output, rebuilt on `home`
                    x = envoy.input
                    value = model.frozen_norm(model.module(_norm_path(model, site), layer), x.to(home),
                                              freeze[(site, layer)], kind="rms").to(x.device)
                    envoy.output = value
                elif slot == "weights":
                    value = _pattern(envoy)
                else:
                    value = envoy.input if slot == "input" else envoy.output
                if backward is not None and site == "z":
                    zs.append(value)
                if (site, layer) in edits:  # the edit works on `home`; its result goes to the reader
                    value = edits[(site, layer)](value.to(home)).to(value.device)
                    if slot == "input":
                        envoy.input = value
                    else:
                        envoy.output = value
                if site in saved and (site not in only or layer in only[site]):
                    saved[site].append(value.to(home))
                if watch is not None:
                    for name in watch_as.get(site, ()):
                        reduced = watch(name, layer, value.to(home))
                        if reduced is not None:
                            watched[(name, layer)] = reduced
                if stop_after == (site, layer):
                    tracer.stop()
        norm = model.envoy(model.adapter.final_norm)
        if backward is not None:
            resid, normed = norm.input.to(home), norm.output.to(home)
            metric = backward(resid, normed)
            finals.append(resid.detach())
            finals.append(normed.detach())
            grads.extend(backward_grads(metric, zs, home))
            tracer.stop()
        elif freeze_final is not None:
            x = norm.input
            resid = x.to(home)
            normed = model.frozen_norm(model.module(model.adapter.final_norm), resid, freeze_final)
            norm.output = normed.to(x.device)
            if final is not None:
                finals.append(final(resid, normed))
            else:
                finals.append(resid)
                finals.append(normed)
        elif final is not None:
            finals.append(final(norm.input.to(home), norm.output.to(home)))
        else:
            finals.append(norm.input.to(home))
            finals.append(norm.output.to(home))
        if last_logits:
            finals.append(model.envoy(model.adapter.unembed).output[:, -1].to(home))
        else:
            tracer.stop()
    reads = {name: torch.stack(saved[site]).detach() for name, site in
             ((n, alias.get(n, n)) for n in requested) if saved[site]}
    embed = finals.pop(0) if read_embed and finals else None
    watched = dict(watched)
    if stop_after is not None and len(finals) < (1 if final is not None else 2):
        return Pass(reads=reads, final_resid=None, final_normed=None, embed=embed, last_logits=None,
                    watched=watched)
    if final is not None:
        return Pass(reads=reads, final_resid=None, final_normed=None, embed=embed,
                    last_logits=finals[1] if last_logits else None, watched=watched, final=finals[0])
    return Pass(reads=reads, final_resid=finals[0], final_normed=finals[1], embed=embed,
                last_logits=finals[2] if last_logits else None, watched=watched,
                grads={"z": torch.stack(list(grads)[::-1])} if backward is not None else {})


def backward_grads(metric: torch.Tensor, zs: list, home: torch.device) -> list[torch.Tensor]:
    """One backward of ``metric`` inside a trace: the gradient of each of ``zs``, last first
    (gradients arrive in the reverse of the forward order).

    Its own function, not a block nested in :func:`run`'s trace: nnsight finds a ``with`` block
    by its line in the source file, and a trace that went the remote way runs its body
    re-generated from the parsed source, whose lines are not the file's (in the local simulation
    the nested ``with metric.backward():`` was then not found and ran as a bare backward). A
    function runs from its own source (on the server: shipped by value with its lines kept)."""
    out = []
    with metric.backward():
        for z in reversed(zs):
            out.append(z.grad.to(home))
    return out
