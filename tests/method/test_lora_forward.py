"""model.direct_lora_forward: the same tensors as peft's LoRA forward, bit for bit, and peft's own forward otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from sd_trainer import model


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(24, 40)
        self.other = torch.nn.Linear(40, 8)

    def forward(self, x):
        return self.other(self.to_q(x))


def lora_block(alpha: float, dropout: float = 0.0) -> Block:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(3)
    block = Block().requires_grad_(False)
    block = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, target_modules=["to_q"],
                                               init_lora_weights="gaussian"), block)
    with torch.no_grad():  # B starts at zero; a random B makes the LoRA term count
        block.to_q.lora_B["default"].weight.normal_()
    return block


def output_and_grads(block: Block, x: torch.Tensor):
    block.zero_grad(set_to_none=True)
    out = block(x)
    (out.square().mean()).backward()
    grads = [p.grad.clone() for p in block.parameters() if p.requires_grad]
    return out.detach(), grads


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("alpha", [4, 8, 3])  # scaling 1 (the multiplication left out), 2, 0.75
def test_direct_forward_gives_peft_bits_for_output_and_grads(alpha):
    peft_block = lora_block(alpha)
    direct_block = copy.deepcopy(peft_block)
    assert model.direct_lora_forward(direct_block.to_q)
    assert not model.direct_lora_forward(direct_block.other)  # not a LoRA layer: left alone
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1))
    peft_out, peft_grads = output_and_grads(peft_block, x)
    direct_out, direct_grads = output_and_grads(direct_block, x)
    assert same_bits(direct_out, peft_out)
    assert len(direct_grads) == 2 and all(same_bits(d, p) for d, p in zip(direct_grads, peft_grads, strict=True))


def test_a_copy_of_the_model_runs_its_own_weights():
    block = lora_block(4)
    model.direct_lora_forward(block.to_q)
    twin = copy.deepcopy(block)
    with torch.no_grad():
        twin.to_q.lora_A["default"].weight.zero_()
    x = torch.randn(3, 24)
    assert torch.equal(twin(x), twin.other(twin.to_q.base_layer(x)))  # the copy's zeroed A, not the original's
    assert not torch.equal(block(x), twin(x))


def test_disabled_merged_or_dropout_states_fall_back_to_peft():
    block = lora_block(8, dropout=0.5)
    reference = copy.deepcopy(block)
    model.direct_lora_forward(block.to_q)
    x = torch.randn(4, 24)
    block.eval(), reference.eval()  # dropout is the identity in eval mode
    assert same_bits(block(x), reference(x))
    block.train(), reference.train()
    torch.manual_seed(5)
    dropped = block(x)
    torch.manual_seed(5)
    assert same_bits(dropped, reference(x))  # the same dropout mask from the same RNG state
    block.to_q.enable_adapters(False)
    assert torch.equal(block(x), block.other(block.to_q.base_layer(x)))
    block.to_q.enable_adapters(True)
    block.eval()
    unmerged = block(x)
    block.to_q.merge()
    assert torch.allclose(block(x), unmerged, atol=1e-5)  # peft's merged path (the base weight holds the LoRA)
