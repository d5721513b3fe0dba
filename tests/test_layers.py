"""The adapter layer against PEFT's LoRA (oracle) and the batched per-task gather."""

import copy

import pytest
import torch

from bora.core.config import AdapterConfig, ConfigError
from bora.lora.inject import inject_adapters_, remove_adapters_
from bora.lora.layers import MultiTaskLoRA

from conftest import tiny_gpt2, tiny_llama, tiny_opt


def _peft_with(lm, targets, A_of, B_of, r, alpha):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(lm), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                      lora_dropout=0.0, init_lora_weights=False))
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                key = name.split("base_model.model.", 1)[1]
                mod.lora_A["default"].weight.copy_(A_of[key])
                mod.lora_B["default"].weight.copy_(B_of[key])
    return pm.eval()


@pytest.mark.parametrize("make,targets", [(tiny_llama, ("q_proj", "v_proj", "down_proj")),
                                          (tiny_gpt2, ("c_attn", "c_fc")),
                                          (tiny_opt, ("q_proj", "v_proj"))])
def test_single_task_matches_peft(make, targets):
    lm = make()
    r, alpha = 4, 8.0
    ref = copy.deepcopy(lm)
    adapters = inject_adapters_(lm, AdapterConfig(rank=r, alpha=alpha, targets=targets, layers=None))
    g = torch.Generator().manual_seed(1)
    A_of, B_of, params = {}, {}, {}
    for k, ((ra, ia), (ob, rb)) in adapters.shapes().items():
        A = torch.randn(ra, ia, generator=g) * 0.1
        B = torch.randn(ob, rb, generator=g) * 0.1
        params[k] = (A, B)
        A_of[adapters.names[k]], B_of[adapters.names[k]] = A, B
    pm = _peft_with(ref, targets, A_of, B_of, r, alpha)
    ids = torch.randint(0, 48, (3, 9))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        with adapters.use(params):  # one adapter, 2-D tensors
            got = lm(input_ids=ids).logits
        per_task = {k: (torch.stack([torch.zeros_like(A), A]), torch.stack([torch.zeros_like(B), B]))
                    for k, (A, B) in params.items()}
        with adapters.use(per_task, torch.ones(3, dtype=torch.long)):
            got_t = lm(input_ids=ids).logits
        # bora's default hierarchy: one shared A (2-D), per-task B (3-D)
        shared_A = {k: (A, torch.stack([torch.zeros_like(B), B])) for k, (A, B) in params.items()}
        with adapters.use(shared_A, torch.ones(3, dtype=torch.long)):
            got_s = lm(input_ids=ids).logits
        base = ref(input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_s, want, atol=1e-5, rtol=1e-5)
    # gradients of the shared A and the task's B equal PEFT's LoRA gradients
    leaves = {k: (A.clone().requires_grad_(), B.clone().requires_grad_()) for k, (A, B) in shared_A.items()}
    with adapters.use(leaves, torch.ones(3, dtype=torch.long)):
        lm(input_ids=ids).logits.square().mean().backward()
    pm(input_ids=ids).logits.square().mean().backward()
    checked = []
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            k = next(k for k, n in adapters.names.items() if n == name.split("base_model.model.", 1)[1])
            torch.testing.assert_close(leaves[k][0].grad, mod.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(leaves[k][1].grad[1], mod.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
            assert not leaves[k][1].grad[0].any()  # task 0 is not in the batch
            checked.append(k)
    assert sorted(checked) == sorted(params)


def test_mixed_batch_each_example_gets_its_own_task():
    lm = tiny_llama()
    adapters = inject_adapters_(lm, AdapterConfig(rank=2, targets=("q_proj", "o_proj", "up_proj"), layers=None))
    T = 4
    g = torch.Generator().manual_seed(0)
    params = {k: (torch.randn(T, *sa, generator=g) * 0.2, torch.randn(T, *sb, generator=g) * 0.2)
              for k, (sa, sb) in adapters.shapes().items()}
    ids = torch.randint(0, 48, (6, 7))
    tids = torch.tensor([3, 0, 2, 2, 1, 3])
    with torch.no_grad(), adapters.use(params, tids):
        mixed = lm(input_ids=ids).logits
    for i, t in enumerate(tids.tolist()):
        single = {k: (A[t], B[t]) for k, (A, B) in params.items()}
        with torch.no_grad(), adapters.use(single):
            alone = lm(input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_base_is_frozen_never_copied_and_restored():
    lm = tiny_llama()
    q = lm.model.layers[0].self_attn.q_proj
    adapters = inject_adapters_(lm, AdapterConfig(rank=2, layers=(0,)))
    wrapped = lm.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, MultiTaskLoRA) and wrapped.base is q
    assert not isinstance(lm.model.layers[1].self_attn.q_proj, MultiTaskLoRA)
    assert all(not p.requires_grad for p in lm.parameters())
    assert sum(1 for _ in wrapped.parameters()) == sum(1 for _ in q.parameters())  # no new weights
    remove_adapters_(adapters)
    assert lm.model.layers[0].self_attn.q_proj is q


def test_layer_selection_and_errors():
    lm = tiny_llama(layers=4)
    a = inject_adapters_(lm, AdapterConfig(rank=2, targets=("v_proj",), layers=(-1, 1)))
    assert sorted(a.indices.values()) == [1, 3] and a.first_layer == 1
    with pytest.raises(ConfigError, match="no module matches"):
        inject_adapters_(tiny_llama(), AdapterConfig(targets=("nonexistent",), layers=None))
    with pytest.raises(ConfigError, match="out of range"):
        inject_adapters_(tiny_llama(), AdapterConfig(layers=(7,)))
    layer = next(iter(a.layers.values()))
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_adapter_(torch.zeros(3, 3), torch.zeros(3, 3))


def test_task_gradients_are_bit_identical_across_backward_passes():
    """A task's gradient sums its examples' rows in a fixed order: repeated backward passes agree bit for bit
    (with indexing, ``B[task_ids]``, the sum's order varied between passes on a multi-threaded CPU)."""
    torch.manual_seed(0)
    layer = MultiTaskLoRA(torch.nn.Linear(64, 576), AdapterConfig(rank=8))
    T, N = 16, 64
    A = torch.randn(T, 8, 64, requires_grad=True)
    B = torch.randn(T, 576, 8, requires_grad=True)
    tids = torch.randint(0, T, (N,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(N, 8, 64)
    w = torch.randn(N, 8, 576)
    layer.set_adapter_(A, B, tids)

    def grads():
        A.grad = B.grad = None
        (layer(x) * w).sum().backward()
        return A.grad.clone(), B.grad.clone()

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        first = grads()
        for _ in range(30):
            again = grads()
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    finally:
        torch.set_num_threads(threads)
