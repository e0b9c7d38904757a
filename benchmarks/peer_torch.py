"""Hugging Face PEFT on torch (CPU, 2 threads) for ``peers.py``: the same weights."""

import copy

import llama
import torch
from peers import ALL_LINEAR, ALPHA, LR, RANK, TARGETS, base_params, batch, config, timed


def _hf_model():
    import transformers

    cfg = config()
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(hf)
    state = {k: torch.tensor(v) for k, v in llama.to_hf(base_params(), cfg).items()}
    model.load_state_dict(state, strict=False)
    return model


def _peft(peft, targets, nf4=False, **kw):
    model = peft.get_peft_model(
        (_nf4 if nf4 else lambda m: m)(_hf_model()),
        peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets), **kw
        ),
    )
    with torch.no_grad():  # B != 0, as after training
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(1e-3)
    return model


def _nf4(model):
    """Every decoder linear layer as bitsandbytes' NF4 ``Linear4bit`` (64-blocks, double
    quantization, fp32 compute), as ``jlora.quantize``'s defaults. Its CPU kernels
    are wrong on some CPUs: ``benchmarks/cpu_kernels.py`` tells; the timing stands."""
    import bitsandbytes as bnb

    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(),
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                    blocksize=64,
                ).to("cpu")  # quantizes
                setattr(module, name, q)
    return model


def _step(model, params, ids):
    opt = torch.optim.AdamW(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        model(ids[:, :-1], labels=ids[:, :-1]).loss.backward()  # HF shifts the labels
        opt.step()

    return step


def run(repeats: int) -> dict:
    import peft

    torch.set_num_threads(2)
    ids = torch.tensor(batch())
    x = ids[:, :-1]
    base = _hf_model().eval()
    full = _hf_model().train()
    lora, wide, dora, qlora = (
        _peft(peft, targets, **kw)
        for targets, kw in (
            (TARGETS, {}),
            (ALL_LINEAR, {}),
            (TARGETS, dict(use_dora=True)),
            (TARGETS, dict(nf4=True)),
        )
    )
    merged = copy.deepcopy(lora).merge_and_unload().eval()
    frozen = _hf_model().train()  # the floor: train only the RMSNorm weights
    for name, p in frozen.named_parameters():
        p.requires_grad_("norm" in name)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    lora_step = _step(lora, trainable, ids)

    def no_grad(m):
        def f():
            with torch.no_grad():
                m(x)

        return f

    trained = lambda m: [p for p in m.parameters() if p.requires_grad]
    calls = dict(
        base_forward=no_grad(base),
        lora_forward=no_grad(lora.eval()),
        merged_forward=no_grad(merged),
        lora_step=lora_step,
        full_step=_step(full, list(full.parameters()), ids),
        frozen_step=_step(frozen, trained(frozen), ids),
        all_linear_step=_step(wide, trained(wide), ids),
        dora_step=_step(dora, trained(dora), ids),
        qlora_step=_step(qlora, trained(qlora), ids),
    )
    return timed(calls, repeats)
