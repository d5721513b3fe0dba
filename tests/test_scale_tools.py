"""The scale-out tools' CPU side: the memory table's shape arithmetic and the GPU check script."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_scale  # noqa: E402


def test_per_task_values_match_the_injected_adapters():
    """The table's count of task-level values equals bora's own model on a small Llama of the same form."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bora.core.config import AdapterConfig, PriorConfig
    from bora.lora.inject import inject_adapters_
    from bora.model.hierarchy import BoraModel

    h, L, heads, kv, hd, mlp = 64, 3, 4, 2, 16, 96
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=h, intermediate_size=mlp, num_hidden_layers=L,
                                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd))
    shapes = memory_scale.module_shapes(h, L, heads, kv, hd, mlp)
    for r, hierarchy in ((4, "B"), (8, "AB")):
        adapters = inject_adapters_(lm, AdapterConfig(rank=r, layers=None))
        model = BoraModel(lm, adapters, ["a", "b"], 4, PriorConfig(hierarchy=hierarchy))
        per_task = sum(model.shapes[k][i][0] * model.shapes[k][i][1]
                       for k in model.shapes for i in model.task_factors())
        assert memory_scale.per_task_values(shapes, r, hierarchy) == per_task
        glob = sum(a[0] * a[1] + b[0] * b[1] for a, b in model.shapes.values())
        assert memory_scale.global_values(shapes, r) == glob
        from bora.lora.inject import remove_adapters_

        remove_adapters_(adapters)


def test_memory_table_renders(tmp_path):
    memory_scale.main(["--md", str(tmp_path / "m.md")])
    text = (tmp_path / "m.md").read_text()
    assert "Llama-3.1-8B" in text and "T=10,000" in text and "does not support" in text


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("bash") is None, reason="checks the no-GPU refusal")
def test_gpu_check_refuses_without_a_gpu():
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable,
                            "GPU_OUT": "/tmp/bora-gpu-check-test"}, timeout=120)
    assert p.returncode != 0 and "no CUDA GPU" in p.stderr
