"""The pipeline end to end: conversations in, text out, equal to transformers' processor + generate + decode."""

import shutil

import pytest
import torch
from helpers import load_hf, test_signal, write_wav
from tokenizer_fixture import hf_processor, write_tokenizer_files

import qwen2audio
from qwen2audio.errors import InputError


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory):
    target = tmp_path_factory.mktemp("pipe") / "model"
    shutil.copytree(tiny_checkpoint, target)
    return write_tokenizer_files(target)




def reference_reply(folder, conversations, audios, **options):
    processor, model = hf_processor(folder), load_hf(folder)
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    batch = processor(text=prompts, audio=audios, return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=False, eos_token_id=[151645, 151643], pad_token_id=151643, **options)
    return processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_batch_and_stream_equal_transformers(folder, tmp_path):
    clips = [test_signal(s, seed=i) for i, s in enumerate([1.0, 2.5, 4.0])]
    # What the WAV file holds, read back the way the file gives it (16-bit rounding included).
    path = str(write_wav(tmp_path / "a.wav", clips[0]))
    clips[0] = qwen2audio.audio.load_audio(path)
    conversations = [
        [{"role": "user", "content": [{"type": "audio", "audio_url": path}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": clips[1]}]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "audio", "audio": clips[2]}, {"type": "text", "text": "Describe."}]},
         {"role": "assistant", "content": "A tone."},
         {"role": "user", "content": [{"type": "audio", "audio": clips[0]}, {"type": "text", "text": "And this?"}]}],
    ]
    audios = clips + [clips[0]]
    pipe = qwen2audio.load(folder)
    options = dict(max_new_tokens=12, repetition_penalty=1.1)
    expected = reference_reply(folder, conversations, audios, **options)
    greedy = dict(options, do_sample=False)
    assert pipe.chat(conversations, **greedy) == expected
    for conversation, text in zip(conversations, expected):  # each row alone, and streamed
        assert pipe.chat(conversation, **greedy) == text
        assert "".join(pipe.stream(conversation, **greedy)) == text
    assert pipe.last_stats["new_tokens"] >= 1


def test_generation_config_defaults_and_explicit_options_win(folder, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(folder, target)
    (target / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.7, "top_k": 20, '
                                                   '"top_p": 0.5, "repetition_penalty": 1.1, '
                                                   '"eos_token_id": [151643, 151645], "pad_token_id": 151643}')
    pipe = qwen2audio.load(target)
    o = pipe.options()
    assert (o.do_sample, o.temperature, o.top_k, o.top_p, o.repetition_penalty, o.eos_token_ids, o.pad_token_id) == (
        True, 0.7, 20, 0.5, 1.1, (151643, 151645), 151643)
    assert pipe.options(top_k=3, do_sample=False).top_k == 3 and pipe.options(top_k=3).temperature == 0.7
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": test_signal(1.0)}]}]
    assert pipe.chat(conversation, seed=7, max_new_tokens=6) == pipe.chat(conversation, seed=7, max_new_tokens=6)
    with pytest.raises(InputError, match="unknown generation option"):
        pipe.chat(conversation, temprature=0.5)


def test_long_audio_chunk_runs_end_to_end(folder):
    pipe = qwen2audio.load(folder)
    long_clip = test_signal(75.0)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": long_clip},
                                                  {"type": "text", "text": "Summarise."}]}]
    prompt = pipe.processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = pipe.processor(prompt, audio=[long_clip], long_audio="chunk")
    assert batch["input_features"].shape[0] == 3  # 30 s + 30 s + 15 s
    assert int((batch["input_ids"] == 151646).sum()) == 750 + 750 + 375
    with pytest.warns(UserWarning, match="first 30 s"):
        short = pipe.processor(prompt, audio=[long_clip])
    assert int((short["input_ids"] == 151646).sum()) == 750
    reply = pipe.chat(conversation, long_audio="chunk", max_new_tokens=4, do_sample=False)
    expected = pipe.generate(**batch, max_new_tokens=4, do_sample=False)[0]  # from the three windows' inputs
    assert reply == pipe.tokenizer.decode(expected.tolist(), skip_special_tokens=True)


def test_prompt_too_long_is_a_clear_error(folder):
    pipe = qwen2audio.load(folder)
    conversation = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match="max_position_embeddings"):
        pipe.chat(conversation, max_new_tokens=5000)
    with pytest.raises(InputError, match="placeholder"):
        pipe.complete("<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:", audio=[])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_is_a_clear_error(folder):
    with pytest.raises(InputError, match="'cuda' is not available"):
        qwen2audio.load(folder, device="cuda")
    with pytest.raises(InputError, match="unknown device"):
        qwen2audio.load(folder, device="tpu9")


def test_threads_and_interleaved_streams_share_one_pipeline(folder):
    """Each generation holds its own KV cache: interleaved streams and concurrent threads on one pipeline give
    exactly the replies they give alone."""
    import threading

    pipe = qwen2audio.load(folder)
    greedy = dict(max_new_tokens=10, do_sample=False, ignore_eos=True)
    conversations = [[{"role": "user", "content": [{"type": "audio", "audio": test_signal(s, seed=i)},
                                                   {"type": "text", "text": text}]}]
                     for i, (s, text) in enumerate([(1.0, "What is it?"), (2.0, "Describe it."), (3.0, "Loud?")])]
    alone = [pipe.chat(c, **greedy) for c in conversations]
    assert len(set(alone)) == 3  # different replies, so a mix-up would show

    streams = [pipe.stream(c, **greedy) for c in conversations]
    pieces: list[list[str]] = [[], [], []]
    live = set(range(3))
    while live:  # one piece of each in turn, as a server's event loop would interleave them
        for i in sorted(live):
            try:
                pieces[i].append(next(streams[i]))
            except StopIteration:
                live.discard(i)
    assert ["".join(p) for p in pieces] == alone

    replies: dict[int, str] = {}
    workers = [threading.Thread(target=lambda i=i: replies.__setitem__(i, pipe.chat(conversations[i % 3], **greedy)))
               for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [replies[i] for i in range(6)] == alone * 2


def test_small_vocabulary_without_eos_generates_like_transformers(tmp_path):
    """No eos in the checkpoint and a vocabulary smaller than the fallback stop ids (151643, 151645): those ids are
    ignored, and min_new_tokens works (it used to index past the vocabulary)."""
    from helpers import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "small", vocab_size=1000, bos_token_id=None, eos_token_id=None)
    (folder / "generation_config.json").unlink(missing_ok=True)
    pipe = qwen2audio.load(folder, quiet=True)
    assert pipe.options().eos_token_ids == () and pipe.options().pad_token_id == 0
    ids = torch.tensor([[5, 17, 300, 999, 42]])
    ours = pipe.generate(ids, max_new_tokens=8, min_new_tokens=3, do_sample=False)
    expected = load_hf(folder).generate(ids, max_new_tokens=8, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, expected[:, ids.shape[1]:])


def test_a_second_turn_prefills_only_its_new_tokens(folder):
    """The cache of the previous turn serves the next: only the tokens after the shared prefix are prefilled, and
    the replies equal those of a pipeline that recomputes everything. Same ids but another clip of the same length
    (every clip is written as the same <|AUDIO|> ids) is not reused past that clip."""
    pipe, fresh = qwen2audio.load(folder), qwen2audio.load(folder)
    greedy = dict(max_new_tokens=8, do_sample=False)
    turn1 = [{"role": "user", "content": [{"type": "audio", "audio": test_signal(2.0, seed=1)},
                                          {"type": "text", "text": "What is it?"}]}]
    reply1 = pipe.chat(turn1, **greedy)
    assert pipe.last_stats["cached_tokens"] == 0
    first_prompt = pipe.inputs(apply_chat_template_text(pipe, turn1), [test_signal(2.0, seed=1)])["input_ids"].shape[1]
    turn2 = turn1 + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "And then?"}]
    reply2 = pipe.chat(turn2, **greedy)
    assert pipe.last_stats["cached_tokens"] >= first_prompt  # the whole first prompt, and the reply's tokens
    new = fresh.chat(turn2, **greedy)
    assert fresh.last_stats["cached_tokens"] == 0 and reply2 == new

    other = [{"role": "user", "content": [{"type": "audio", "audio": test_signal(2.0, seed=2)},
                                          {"type": "text", "text": "What is it?"}]}]
    audio_start = pipe.inputs(apply_chat_template_text(pipe, other), [test_signal(2.0, seed=2)])["input_ids"][0] \
        .tolist().index(151646)
    assert pipe.chat(other, **greedy) == fresh.chat(other, **greedy)
    assert pipe.last_stats["cached_tokens"] == audio_start  # the system prompt and "Audio 1: <|audio_bos|>" only

    pipe.forget_prefixes()  # the same conversation again prefills all of it
    assert pipe.chat(other, **greedy) == fresh.chat(other, **greedy) and pipe.last_stats["cached_tokens"] == 0


def apply_chat_template_text(pipe, conversation) -> str:
    return pipe.processor.apply_chat_template(conversation, add_generation_prompt=True)
