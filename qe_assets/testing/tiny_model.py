"""A tiny causal language model built on the spot, so training tests need no model hub: a
byte-level BPE tokenizer trained on the dataset's own text, with a chat template that marks the
assistant's turns for `assistant_only_loss`, and a randomly initialised 2-layer Llama."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# `{% generation %}` marks what the assistant says: TRL's assistant_only_loss trains on it alone.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|end|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] + '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)
SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tiny_model(
    folder: Path, texts: Iterable[str], vocab_size: int = 1024, embedding_std: float | None = None
) -> Path:
    """Tokenizer + model saved with save_pretrained into `folder`; returns it.

    `embedding_std`: the (tied) embeddings drawn with this spread instead of the default 0.02.
    LoRA leaves them and the final norm frozen, so with the default the logits of a random model
    stay within a narrow range and an adapter cannot make any token clearly the likeliest; 0.1
    lets a few dozen LoRA steps teach an answer and its end of turn (`make demo-loop`)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|end|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    if embedding_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    model.save_pretrained(folder)
    return folder


def teach_reply(
    folder: Path, pairs: list[tuple[str, str]], steps: int = 40, learning_rate: float = 0.01
) -> Path:
    """Train the whole model in `folder` (in place, a few seconds) to answer each (question,
    reply) pair's question with its reply and end its turn: a stand-in production model that
    answers, badly, as a served base must (the gate leaves out an item whose production answer
    runs to max_tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    rows = []
    for question, reply in pairs:
        turns = [{"role": "user", "content": question}]
        head = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        full = tokenizer.apply_chat_template(
            [*turns, {"role": "assistant", "content": reply}], tokenize=True
        )
        head, full = (list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in (head, full))
        rows.append((full, len(head)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = [rows[int(i)] for i in torch.randint(len(rows), (8,), generator=generator)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (full, head) in enumerate(batch):
            ids[row, : len(full)] = torch.tensor(full)
            labels[row, head : len(full)] = torch.tensor(full[head:])
            mask[row, : len(full)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder
