"""ttserve's host-side pieces without a device: stop strings over a token stream
(runtime/serve/textstream.py) and request validation (runtime/serve/protocol.py)."""
from __future__ import annotations

import pytest

from runtime.serve.protocol import APIError, parse_chat, parse_completion, parse_json
from runtime.serve.textstream import TextStream


class Pieces:
    """A tokenizer whose token i decodes to pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def stream_decoder(self):
        return lambda token: self.pieces[token]


def run(pieces, stops):
    stream = TextStream(Pieces(pieces), stops)
    sent, stopped_at = [], None
    for i in range(len(pieces)):
        text, stopped = stream.push(i)
        sent.append(text)
        if stopped:
            stopped_at = i
            break
    if stopped_at is None:
        sent.append(stream.flush())
    return sent, stopped_at


def test_stop_string_across_tokens_is_never_sent():
    sent, stopped_at = run(["The", " answer", " is", " 4", "2", ".", " Then"], ["42."])
    assert "".join(sent) == "The answer is " and stopped_at == 5
    assert sent[3] == " "  # "4" is held back: it may begin "42."


def test_held_text_is_released_when_it_is_not_a_stop():
    sent, stopped_at = run(["a", " <", "b", " <", "/s", ">", "c"], ["</s>"])
    assert sent[:3] == ["a", " ", "<b"]  # "<" held back until "b" shows it is not "</s>"
    assert "".join(sent) == "a <b " and stopped_at == 5


def test_earliest_of_several_stops_wins_and_no_stop_flushes_everything():
    sent, stopped_at = run(["x", "yz", "w"], ["zw", "y"])
    assert "".join(sent) == "x" and stopped_at == 1
    sent, stopped_at = run(["ab", "c"], ["cd"])
    assert "".join(sent) == "abc" and stopped_at is None and sent[-2] == ""  # "c" held until the end


def test_real_tokenizer_stream(smollm2_dir):
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    ids = tok.encode("Paris is the capital of France. It is big.", add_special_tokens=False)
    stream = TextStream(tok, ["France."])
    out = ""
    for i in ids:
        text, stopped = stream.push(i)
        out += text
        if stopped:
            break
    assert stopped and out == "Paris is the capital of "


MODEL = "m"


def error_of(call) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    assert info.value.status == 400
    body = info.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return info.value


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x"}, "model", "required"),
    ({"model": 3, "prompt": "x"}, "model", "string"),
    ({"model": "other", "prompt": "x"}, "model", "does not exist"),
    ({"model": MODEL}, "prompt", "required"),
    ({"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ({"model": MODEL, "prompt": []}, "prompt", "empty"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"model": MODEL, "prompt": [1, 100000]}, "prompt", "token ids"),
    ({"model": MODEL, "prompt": {"a": 1}}, "prompt", "string or an array"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens", "at least 1"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 5.0}, "max_tokens", "integer"),
    ({"model": MODEL, "prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ({"model": MODEL, "prompt": "x", "temperature": 3}, "temperature", "between"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    ({"model": MODEL, "prompt": "x", "seed": 1.5}, "seed", "integer"),
    ({"model": MODEL, "prompt": "x", "stop": 7}, "stop", "string"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop", "empty"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"model": MODEL, "prompt": "x", "n": 2}, "n", "not supported"),
    ({"model": MODEL, "prompt": "x", "logprobs": 3}, "logprobs", "not supported"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"model": MODEL, "prompt": "x", "frobnicate": 1}, "frobnicate", "unrecognized"),
])
def test_completion_fields_are_checked(body, param, words):
    error = error_of(lambda: parse_completion(body, MODEL, vocab_size=1000))
    assert error.param == param and words in error.message, error.message


@pytest.mark.parametrize("body, param, words", [
    ({"model": MODEL}, "messages", "required"),
    ({"model": MODEL, "messages": []}, "messages", "non-empty"),
    ({"model": MODEL, "messages": ["hi"]}, "messages[0]", "object"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "one of"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "text parts"),
    ({"model": MODEL, "messages": [{"role": "user", "content": ""}]}, "messages", "empty"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3},
     "max_completion_tokens", "at least 1"),
])
def test_chat_fields_are_checked(body, param, words):
    error = error_of(lambda: parse_chat(body, MODEL))
    assert error.param == param and words in error.message, error.message


def test_valid_requests_parse():
    params = parse_completion({"model": MODEL, "prompt": ["hello"], "max_tokens": 5, "temperature": 0,
                               "top_p": 0.5, "seed": 3, "stop": "\n", "stream": True,
                               "stream_options": {"include_usage": True}, "n": 1, "logprobs": None}, MODEL, 1000)
    assert (params.prompt, params.max_tokens, params.temperature, params.top_p, params.seed, params.stop,
            params.stream, params.include_usage) == ("hello", 5, 0.0, 0.5, 3, ["\n"], True, True)
    assert parse_completion({"model": MODEL, "prompt": [5, 6]}, MODEL, 1000).prompt == [5, 6]
    chat = parse_chat({"model": MODEL, "messages": [{"role": "developer", "content": "be brief"},
                                                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       "max_tokens": 4}, MODEL)
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat.max_tokens == 4 and chat.temperature == 1.0  # OpenAI's default temperature


def test_malformed_json():
    for raw in (b"{not json", b"[1, 2]", b"\xff"):
        error = error_of(lambda: parse_json(raw))
        assert error.param is None and "JSON" in error.message


def test_serving_modules_do_not_import_torch():
    """ttserve and the vLLM interface run where ttnn runs: without torch."""
    import subprocess
    import sys

    code = ("import sys, runtime.engine, runtime.serve.scheduler, runtime.serve.app, runtime.serve.server, "
            "runtime.serve.cli, runtime.vllm_model\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ttserve_errors_are_one_line(tmp_path, capsys):
    from runtime.serve import cli

    assert cli.main(["--program", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a ttcompile artifact" in err
    assert cli.main(["--program", str(tmp_path), "--max-waiting", "0"]) == 2
    assert "--max-waiting" in capsys.readouterr().err
