"""vLLM's /tokenize and /detokenize: the server's own tokenizer and chat template, over HTTP."""


def test_a_prompt_tokenizes_to_the_models_ids_and_back(tiny_server, default_tokenizer):
    text = "def quicksort(arr):\n    héllo 中文 <|im_end|>"
    r = tiny_server.request("POST", "/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True})
    assert r.status == 200
    body = r.json()
    assert body["tokens"] == default_tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 2048 and body["token_strs"][-1] == "<|im_end|>"
    back = tiny_server.request("POST", "/detokenize", {"model": "tiny", "tokens": body["tokens"]})
    assert back.status == 200 and back.json() == {"prompt": text}


def test_messages_tokenize_through_the_chat_template(tiny_server, default_tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    for opened in (True, False):
        r = tiny_server.request("POST", "/tokenize", {"messages": messages, "add_generation_prompt": opened})
        want = default_tokenizer.apply_chat_template(messages, add_generation_prompt=opened)
        assert r.json()["tokens"] == default_tokenizer.encode(want)
    assert r.json()["count"] < len(default_tokenizer.encode(
        default_tokenizer.apply_chat_template(messages, add_generation_prompt=True)))


def test_bad_requests_are_400s_naming_the_field(tiny_server):
    both = tiny_server.request("POST", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert both.status == 400 and both.json()["error"]["param"] == "prompt"
    far = tiny_server.request("POST", "/detokenize", {"tokens": [1, 10**9]})
    assert far.status == 400 and far.json()["error"]["param"] == "tokens"


def test_the_api_key_guards_them_too(strict_server):
    headers = {"Host": strict_server.url.split("//")[1]}
    assert strict_server.request("POST", "/tokenize", {"prompt": "a"}, headers).status == 401
    keyed = {**headers, "Authorization": f"Bearer {strict_server.api_key}"}
    assert strict_server.request("POST", "/tokenize", {"prompt": "a"}, keyed).status == 200
