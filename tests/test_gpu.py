"""On a CUDA GPU: the kernel's results equal the CPU's for every family in fp32 (1e-4), and a model
spread over two GPUs with ``device_map`` equals it on one. Skipped without CUDA (CI has none);
``bench/gpu.sh`` runs these on a GPU machine."""

import pytest
import torch

from selfrepair import load_model, run_sweep, self_repair
from selfrepair.models import tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
from families import CORE as FAMILIES
QUANTITIES = ("direct_effect", "ablated_direct_effect", "delta_logit", "self_repair", "from_heads",
              "from_mlps", "from_norm", "from_block_norms", "scale_ablated")


def rows(model, n=6, seq=16):
    return torch.randint(0, model.d_vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32: TF32 matmuls would differ from the CPU by ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_cuda_equals_cpu_fp32(family, ablation):
    cpu = load_model(tiny_model(family), device="cpu", dtype="float32")
    gpu = load_model(tiny_model(family), device="cuda", dtype="float32")
    tok = rows(cpu)
    a = self_repair(cpu, tok, ablation=ablation, progress=False)
    b = self_repair(gpu, tok, ablation=ablation, progress=False)
    for q in QUANTITIES:
        torch.testing.assert_close(getattr(b, q).cpu(), getattr(a, q), atol=1e-4, rtol=1e-4, msg=q)
    sa = run_sweep(cpu, tok, ablation=ablation, batch_size=4, top_percent=20, progress=False)
    sb = run_sweep(gpu, tok, ablation=ablation, batch_size=4, top_percent=20, progress=False)
    torch.testing.assert_close(sb.sum_all, sa.sum_all, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("family", FAMILIES)
def test_device_map_over_two_gpus_equals_one(family):
    one = load_model(tiny_model(family), device="cuda:0", dtype="float32")
    blocks = one.adapter.blocks
    n = one.n_layers
    # the last block on GPU 1, everything else (embeddings, final norm, unembedding) on GPU 0: the
    # residual crosses to GPU 1 and back, and edits and reads of the last block cross too
    spread_map = {name.rsplit(".", 1)[0]: 1 if name.startswith(f"{blocks}.{n - 1}.") else 0
                  for name, _ in one.hf.named_parameters(remove_duplicate=False)}
    spread = load_model(tiny_model(family), dtype="float32", device_map=spread_map)
    assert spread.block_device(n - 1).index == 1 and spread.block_device(0).index == 0
    tok = rows(one)
    for ablation in ("resample", "mean"):
        a = self_repair(one, tok, ablation=ablation, progress=False)
        b = self_repair(spread, tok, ablation=ablation, progress=False)
        for q in QUANTITIES:
            torch.testing.assert_close(getattr(b, q).cpu(), getattr(a, q).cpu(), atol=1e-5, rtol=1e-5, msg=q)
