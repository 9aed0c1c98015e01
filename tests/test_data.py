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


# ----------------------------------------------------------------------------------------------
# Tokenizer semantics: BOS / EOS on raw text as the tokenizer's own config says

@needs_default
def test_raw_text_bos_follows_the_tokenizer(tmp_path):
    """SmolLM2 adds no BOS to raw text (transformers' tokenizer(text) agrees); a tokenizer.json whose
    post-processor adds one (Llama 3's) gets it, as transformers and llama.cpp give it."""
    from tokenizers import processors
    from transformers import AutoTokenizer
    from data import load_tokenizer
    from formats import default_model_dir
    text = "Once upon a time, in Zürich"
    tok = load_tokenizer("default")
    assert not tok.add_bos and tok.encode_text(text) == AutoTokenizer.from_pretrained(default_model_dir())(text)["input_ids"]
    d = family_folder(tmp_path, "llama3.1")
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    tk.save(str(d / "tokenizer.json"))
    tok = load_tokenizer(d)
    ids = tok.encode_text(text)
    assert tok.add_bos and ids[0] == bos and ids == AutoTokenizer.from_pretrained(str(d))(text)["input_ids"]
    assert ids[1:] == tok.encode(text)


def test_gguf_add_bos_token_is_read(tmp_path):
    """A GGUF's tokenizer.ggml.add_bos_token decides, as in llama.cpp (SentencePiece vocabularies default to yes)."""
    import gguf
    from data import load_tokenizer
    for add_bos in (True, False):
        w = gguf.GGUFWriter(str(tmp_path / f"t{add_bos}.gguf"), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        tokens = ["<s>", "</s>", "a", "b", "ab"]
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 1, 1, 1])
        w.add_token_merges(["a b"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(add_bos)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
        tok = load_tokenizer(tmp_path / f"t{add_bos}.gguf")
        assert tok.encode_text("ab") == [0] * add_bos + [4]


# ----------------------------------------------------------------------------------------------
# Dataset shapes

CHATS = [[dict(role="system", content="Be kind."), dict(role="user", content="Hi there"),
          dict(role="assistant", content="Hello! ünïcode"), dict(role="user", content="More?"),
          dict(role="assistant", content="Sure.")],
         [dict(role="user", content="Q2"), dict(role="assistant", content="A2")]]
SHAREGPT_ROLE = dict(system="system", user="human", assistant="gpt")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_dataset_shapes_give_the_same_tokens_as_messages(tmp_path):
    """ShareGPT conversations and prompt/completion pairs are the messages they stand for: same tokens,
    same masks; each file's shape is counted and reported."""
    from data import encode_example, load_tokenizer, prompt_format, read_dataset
    write_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    fmt = prompt_format(tok)
    messages = _write_jsonl(tmp_path / "m.jsonl", [dict(messages=c) for c in CHATS])
    sharegpt = _write_jsonl(tmp_path / "s.jsonl", [dict(conversations=[dict(**{"from": SHAREGPT_ROLE[m["role"]]},
                                                                          value=m["content"]) for m in c]) for c in CHATS])
    prompt_completion = _write_jsonl(tmp_path / "p.jsonl", [dict(prompt=c[:-1], completion=c[-1:]) for c in CHATS])
    single = _write_jsonl(tmp_path / "q.jsonl", [dict(prompt="Q2", completion="A2")])
    enc = lambda path: [encode_example(tok, fmt, c, 512) for c in read_dataset(path)]
    assert enc(sharegpt) == enc(messages) == enc(prompt_completion)
    assert enc(single) == enc(messages)[1:]
    assert read_dataset(sharegpt).shapes == {"sharegpt": 2} and read_dataset(single).describe() == "1 prompt-completion"
    # Every assistant turn carries loss (two in the first conversation), or only the last one.
    ids, tgt, _ = encode_example(tok, fmt, CHATS[0], 512)
    said = lambda t: tok.decode([x for x in t if x != -100])
    assert said(tgt) == "Hello! ünïcode<|im_end|>Sure.<|im_end|>"
    assert said(encode_example(tok, fmt, CHATS[0], 512, last_turn_only=True)[1]) == "Sure.<|im_end|>"


def test_text_shape_puts_loss_on_every_token(tmp_path):
    from data import IGNORE, encode_example, load_tokenizer, prompt_format, read_dataset
    write_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    (conv,) = read_dataset(_write_jsonl(tmp_path / "t.jsonl", [dict(text="plain words, no chat")]))
    ids, tgt, _ = encode_example(tok, prompt_format(tok), conv, 512)
    assert ids + tgt[-1:] == tok.encode("plain words, no chat") + [tok.eos_id]
    assert IGNORE not in tgt and tgt == ids[1:] + [tok.eos_id]


def test_json_array_parquet_and_datasets_folder_read_as_jsonl(tmp_path):
    pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    from data import read_dataset
    rows = [dict(messages=c) for c in CHATS] + [dict(instruction="Say hi", input="", output="hi")]
    want = read_dataset(_write_jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    import pyarrow as pa
    import pyarrow.parquet as pq
    chats = [dict(messages=c) for c in CHATS]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "a.parquet")
    datasets.Dataset.from_list(chats).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(chats)).save_to_disk(str(tmp_path / "saved_dict"))
    assert read_dataset(tmp_path / "a.json") == want
    for p in ("a.parquet", "saved", "saved_dict"):
        got = read_dataset(tmp_path / p)
        assert got == want[:2] and got.shapes == {"messages": 2}, p


def test_dataset_errors_name_the_file_and_line(tmp_path, monkeypatch):
    import sys
    from data import read_dataset
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(text="fine")) + "\n\n" + json.dumps(dict(question="?", answer="!")) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: a record of no known shape \(keys \['answer', 'question'\]\)"):
        read_dataset(bad)
    bad.write_text(json.dumps(dict(conversations=[{"from": "robot", "value": "x"}])) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: conversations\[0\] has from 'robot'"):
        read_dataset(bad)
    bad.write_text(json.dumps(dict(prompt="p", completion=3)) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'prompt' and 'completion' must be strings or arrays"):
        read_dataset(bad)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)   # as if pyarrow were not installed
    with pytest.raises(ValueError, match="x.parquet: reading Parquet needs the optional package 'pyarrow'"):
        read_dataset(tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="not one written by datasets' save_to_disk"):
        read_dataset(tmp_path)
