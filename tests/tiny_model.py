"""A tiny from-config Llama and an in-memory tokenizer with a ChatML template: no hub, no download.

Used by the unit tests and, saved to a directory, as `model.base` for the end-to-end pipeline tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model writes an answer to the question",
    "what is two plus two ? it is four .",
    "please list three colors : red , green and blue",
    "system user assistant you are a helpful bot",
    "write a short poem about the sea and the sky",
    "is the claim true or false ? answer : true . answer : false .",  # DCT and fact verification's labels
]
# SPCT's boxed scores, one token per digit (only for split_digits: a larger vocabulary changes every
# random output, and the engine tests pin those)
DIGITS_LINE = "scores : \\ boxed { 1 , 2 , 3 , 4 , 5 , 6 , 7 , 8 , 9 , 0 }"


def make_tiny_model_and_tokenizer(seed: int = 0, split_digits: bool = False):
    """A 2-layer Llama and a WordLevel tokenizer with a ChatML template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if split_digits:  # digits one by one, as SmolLM2's tokenizer splits them (the GRM reads scores so)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    corpus = CORPUS + ([DIGITS_LINE] if split_digits else [])
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        # RoPE: no position table, so the context costs nothing; long enough for every test's prompts
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_tiny_model(path: Path, seed: int = 0, split_digits: bool = True) -> Path:
    """Write the tiny model as a safetensors checkpoint directory usable as `model.base`: digits one
    token each by default, as SmolLM2's tokenizer writes them (SPCT label-scores its boxed scores)."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed, split_digits=split_digits)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def bias_lm_head(model, bias: dict[int, float]) -> None:
    """Give the model's output layer a bias {token id: logit offset} (to force or forbid tokens in tests)."""
    head = model.lm_head
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.zero_()
        for i, v in bias.items():
            new.bias[i] = v
    model.lm_head = new


VERDICT_LINES = ("Verdict: yes\n", "Verdict: no\n")


def save_tiny_judging_model(path: Path, yes_logit: float = -0.7, seed: int = 0) -> Path:
    """The tiny model of `save_tiny_model`, whose every token is one of two whole verdict lines
    (`Verdict: yes` / `Verdict: no`, added tokens), drawn with the same odds in any context: every
    judgment parses and k sampled votes split as coin flips do (yes for about one vote in four at
    the judge's temperature 0.7), so SPAR's refinement trees fail at their roots, grow past depth 1
    and sometimes pass the gate. The shared tiny model has no "Verdict" in its vocabulary (none of its
    votes parses), and growing that vocabulary would change every random output the tests pin.

    How: one hidden dimension of every input embedding is set far above the rest, so after the
    final norm the hidden state is nearly the same constant vector at every position, and that
    dimension's lm_head column sets each token's logit (others -10)."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed, split_digits=True)
    tokenizer.add_tokens(list(VERDICT_LINES))
    model.resize_token_embeddings(len(tokenizer))
    yes, no = tokenizer.convert_tokens_to_ids(list(VERDICT_LINES))
    scale = model.config.hidden_size ** 0.5  # that dimension's value after the final RMSNorm
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 20.0
        head = model.lm_head.weight
        head[:, 0] = -10.0 / scale
        head[yes, 0] = yes_logit / scale
        head[no, 0] = 0.0
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
