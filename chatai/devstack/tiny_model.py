"""A tiny random Llama with a real tokenizer and chat template, for tests and the demo.

Nothing can be downloaded on the test machines, yet the worker must be exercised through the
real vLLM engine. This writes a complete Hugging Face model folder (about 1-2 MB): a two-layer
Llama (hidden size 128, two heads of size 64, the smallest the vLLM CPU attention supports),
float32 safetensors, a byte-level BPE tokenizer trained here on a small built-in corpus, bos /
eos / pad tokens, a Jinja chat template and a generation config. Its text is gibberish, but it
tokenizes, templates, streams, stops and counts exactly like a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Hermes' tool-call markers: ordinary added tokens (not special, so decoding keeps them and
# vLLM's ``hermes`` tool parser finds them in the text), as in Hermes, Qwen 2.5 and others.
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
VOCAB_SIZE = 1024

# ChatML-like: every turn ends with the eos token, so a chat reply stops where a turn would.
# Tool-capable the way Hermes-style templates are: the tools are named in a system turn (by name
# only: a real template writes their whole schemas, which would fill most of this model's short
# context), an
# assistant's tool calls are written as <tool_call>{"name": ..., "arguments": ...}</tool_call>,
# a tool's answer is a turn of its own. Content may be a string or a list of text parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>\\nTools: ' }}"
    "{{ tools | map(attribute='function') | map(attribute='name') | join(', ') }}"
    "{{ '. Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.' + eos_token + '\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else "
    "(message['content'] or []) | map(attribute='text') | select('string') | join('') %}"
    "{{ '<|' + message['role'] + '|>\\n' + (content or '') }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{{ fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson }}{{ '}</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A researcher runs a language model on a cluster.
Slurm schedules batch jobs on the nodes; backfill fills the gaps in the schedule with short jobs.
RabbitMQ carries requests from the gateway to the workers and the replies back again.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is.
Once upon a time there was a small model that learned to count: one two three four five six
seven eight nine ten. The weather is nice, the sun is shining and the birds are singing.
def main(): print("hello world") return 0  # code, numbers 0123456789 and symbols {}[]()<>=+-*/
Privacy matters: prompts are never stored. Tokens stream one after another, as fast as they can.
Universities and research centres own the GPUs; the service soaks up the idle time between jobs.
"""


_SYLLABLES = "ka ri to me nu sa lo vi de pa zu ren tal mor quin ex ion ent ver ste".split()


def _corpus() -> list[str]:
    """The built-in text, plus made-up words (fixed seed) so BPE fills a ~1k vocabulary."""
    import random

    lines = [line.strip() for line in _CORPUS.strip().splitlines() if line.strip()]
    out: list[str] = []
    for i in range(40):
        for line in lines:
            out.append(line if i % 2 == 0 else line.lower())
            out.append(" ".join(reversed(line.split())))
    rng = random.Random(1234)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    for _ in range(400):
        out.append(" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 9999)}.")
    return out


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE (every string is encodable) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens(TOOL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the model folder and return its path. Same seed, same weights and tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Some loaders read the template from its own file, older ones from tokenizer_config.json.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)
    return out


def make_tiny_lora(out_dir: str | Path, base_model: str | Path, rank: int = 8, seed: int = 1) -> Path:
    """A LoRA adapter for the tiny model, in PEFT's layout (``adapter_config.json`` and
    ``adapter_model.safetensors``), as fine-tuning with PEFT writes one: random ``A`` and ``B`` on
    every layer's query and value projections, large enough to change the model's answers."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(base_model) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj, width in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=gen) * 0.5
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["q_proj", "v_proj"], "inference_mode": True,
    }, indent=2))
    return out
