"""Chat templates, loss masks, tokenizer semantics and dataset shapes, against transformers."""
import json
from pathlib import Path

import pytest

from conftest import needs_default, write_tiny_tokenizer

TEMPLATES = Path(__file__).parent / "templates"

# family: (template file, bos, eos, special tokens, extra stop tokens as generation_config.json lists them)
FAMILIES = {
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct", "<|begin_of_text|>", "<|eot_id|>",
                 ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"], ["<|eom_id|>"]),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct", "<|begin_of_text|>", "<|eot_id|>",
                 ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"], []),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], []),
    "qwen3": ("Qwen-Qwen3-0.6B", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], []),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407", "<s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]"], []),
    "phi3.5": ("microsoft-Phi-3.5-mini-instruct", "<s>", "<|endoftext|>",
               ["<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], ["<|end|>"]),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], []),
    "gemma2": ("google-gemma-2-2b-it", "<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
               ["<end_of_turn>"]),
    "deepseek-r1-distill": ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "<｜begin▁of▁sentence｜>",
                            "<｜end▁of▁sentence｜>", ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                                   "<｜Assistant｜>"], []),
}
NO_SYSTEM = {"gemma2"}   # its template raises on a system message

CONVERSATIONS = [
    [dict(role="system", content="You answer in one short sentence."),
     dict(role="user", content="Grüß dich! What is 2 + 2? 日本語でも答えて。"),
     dict(role="assistant", content="2 + 2 = 4 — 四です。")],
    [dict(role="user", content="Name a colour."), dict(role="assistant", content="Blue."),
     dict(role="user", content="Another one, please."), dict(role="assistant", content="Crème-coloured green.")],
    [dict(role="system", content="Be terse."), dict(role="user", content="Hi"), dict(role="assistant", content="Hello."),
     dict(role="user", content="Bye"), dict(role="assistant", content="Goodbye!")],
]


def family_folder(tmp_path, family):
    """The default model's byte-level BPE (real merges) with the family's special tokens and template."""
    from tokenizers import AddedToken, Tokenizer
    from formats import default_model_dir
    name, bos, eos, specials, stops = FAMILIES[family]
    d = tmp_path / family
    d.mkdir()
    tk = Tokenizer.from_file(str(Path(default_model_dir()) / "tokenizer.json"))
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tk.save(str(d / "tokenizer.json"))
    template = (TEMPLATES / f"{name}.jinja").read_text()
    (d / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token=bos, eos_token=eos, chat_template=template)))
    if stops:
        (d / "generation_config.json").write_text(json.dumps(dict(
            eos_token_id=[tk.token_to_id(eos)] + [tk.token_to_id(s) for s in stops])))
    return d


def hf_ids(hf, msgs, gen):
    out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@needs_default
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_template_ids_and_masks_equal_transformers(tmp_path, family):
    """Real templates: our token ids equal transformers' apply_chat_template, with and without the
    generation prompt, and exactly the assistant turns carry loss, each ending with a stop token."""
    from transformers import AutoTokenizer
    from data import encode_chat, load_tokenizer, prompt_format
    d = family_folder(tmp_path, family)
    hf, tok = AutoTokenizer.from_pretrained(str(d)), load_tokenizer(d)
    assert prompt_format(tok)["name"] == "template"
    convs = [c[1:] if family in NO_SYSTEM and c[0]["role"] == "system" else c for c in CONVERSATIONS]
    for msgs in convs:
        ids, mask = encode_chat(tok, msgs)
        assert ids == hf_ids(hf, msgs, False), (family, msgs)
        prompt = msgs[:-1]
        assert encode_chat(tok, prompt, add_generation_prompt=True)[0] == hf_ids(hf, prompt, True)
        runs = [(a, b) for a, b in _runs(mask)]
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert len(runs) == len(answers), (family, tok.decode(ids))
        for (a, b), answer in zip(runs, answers):
            said = tok.decode(ids[a:b])
            assert answer in said and ids[b - 1] in tok.stop_ids, (family, said)
            assert not tok.stop_ids & set(ids[a:b - 1]), (family, said)   # it ends at the first stop token
            # Nothing of the prompt: no user or system text, no role header before the answer.
            assert said.split(answer)[0].strip() in ("", "<think>\n\n</think>"), (family, said)
            for m in msgs:
                if m["role"] != "assistant":
                    assert m["content"] not in said


def _runs(mask):
    from data import _runs
    return _runs(mask)


GENERATION_CHATML = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_generation_markers_give_transformers_assistant_mask(tmp_path):
    """A template with {% generation %} markers: the mask is transformers' return_assistant_tokens_mask."""
    from transformers import AutoTokenizer
    from data import encode_chat, load_tokenizer
    write_tiny_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=GENERATION_CHATML)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf, tok = AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)
    msgs = CONVERSATIONS[1]
    out = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encode_chat(tok, msgs)
    assert ids == list(out["input_ids"]) and [int(m) for m in mask] == list(out["assistant_masks"])
    assert sum(mask) == len("Blue.<|im_end|>".encode()) - len("<|im_end|>") + 1 + \
        len("Crème-coloured green.".encode()) + 1


def test_special_tokens_in_user_text_are_plain_text(tmp_path):
    """A user who writes "<|im_end|>" gets the bytes of that text, not the end-of-turn token; the template's
    own special tokens stay special."""
    from data import encode_chat, load_tokenizer
    write_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    msgs = [dict(role="user", content="say <|im_end|> now"), dict(role="assistant", content="ok")]
    ids, mask = encode_chat(tok, msgs)
    end = tok.token_to_id("<|im_end|>")
    assert ids.count(end) == 2                      # the user's turn and the assistant's turn end with it
    assert tok.decode(ids).count("<|im_end|>") == 3  # and the user's text still says it
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("ok") + [end]
