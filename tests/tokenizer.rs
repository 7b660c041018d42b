//! Tokenizer and chat-template parity with transformers, using the reference folder
//! (`../shared/reference` next to the crate, or `$TUNA_REFERENCE`).

use crate::common;

use common::reference_dir;
use std::path::PathBuf;

use serde_json::{Value, json};
use tuna::tokenizer::Tokenizer;
use tuna::tokenizer::chat_template::strftime_now;

fn expected() -> Value {
    let p = reference_dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn tiny_llama() -> Tokenizer {
    let dir = reference_dir().join("tiny-llama");
    Tokenizer::from_folder(&dir).unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()))
}

#[test]
fn token_ids_and_decoding_match_transformers() {
    let tok = tiny_llama();
    let exp = expected();
    let cases = exp["tokenizer"].as_array().expect("tokenizer section");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true), ids, "ids of {text:?}");
        assert_eq!(
            tok.encode(text, false),
            ids,
            "ids of {text:?} (no specials)"
        );
        let decoded = case["decoded"].as_str().unwrap();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            decoded,
            "decoding of {text:?}"
        );
    }
}

#[test]
fn chat_templates_match_transformers() {
    let tok = tiny_llama();
    let exp = expected();
    let cases = exp["chat_template"]
        .as_array()
        .expect("chat_template section");
    assert!(!cases.is_empty());
    for case in cases {
        let messages = case["messages"].as_array().unwrap();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = tok.apply_chat_template(messages, agp, None).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "messages {messages:?}");
    }
}

#[test]
fn special_tokens_from_config_files() {
    let tok = tiny_llama();
    assert_eq!(tok.eos_token_ids(), vec![2]);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.pad_token_id(), Some(2));
    assert!(!tok.add_bos_token());
    assert_eq!(tok.vocab_size(), 49152);
    // Skipping special tokens drops them.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false);
    assert_eq!(ids[0], 1);
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

fn folder_with(files: &[(&str, &str)]) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tuna-tok-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        reference_dir().join("tiny-llama/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

#[test]
fn template_from_tokenizer_config_string_or_list_and_eos_lists() {
    let cfg = json!({
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": "<|im_end|>",
        "add_bos_token": true,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"}
        ]
    });
    let dir = folder_with(&[
        ("tokenizer_config.json", &cfg.to_string()),
        ("generation_config.json", r#"{"eos_token_id": [0, 2]}"#),
    ]);
    let tok = Tokenizer::from_folder(&dir).unwrap();
    assert_eq!(tok.eos_token_ids(), vec![0, 2]);
    // add_bos_token prepends BOS with special tokens only.
    assert_eq!(
        tok.encode("Hello, world!", true),
        vec![1, 19556, 28, 905, 17]
    );
    assert_eq!(tok.encode("Hello, world!", false), vec![19556, 28, 905, 17]);
    let out = tok
        .apply_chat_template(&[json!({"role": "user", "content": "hi"})], false, None)
        .unwrap();
    assert_eq!(out, "<|im_start|>user: hi\n");

    // Without token strings in tokenizer_config.json, the ids of generation_config.json name them.
    let dir = folder_with(&[
        ("tokenizer_config.json", "{}"),
        (
            "generation_config.json",
            r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#,
        ),
    ]);
    let tok = Tokenizer::from_folder(&dir).unwrap();
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.eos_token_ids(), vec![2, 0]);

    let cfg = json!({"eos_token": "<|im_end|>", "chat_template": "[{{ messages[0].content }}]"});
    let dir = folder_with(&[("tokenizer_config.json", &cfg.to_string())]);
    let tok = Tokenizer::from_folder(&dir).unwrap();
    let out = tok
        .apply_chat_template(&[json!({"role": "user", "content": "x"})], false, None)
        .unwrap();
    assert_eq!(out, "[x]");
}

#[test]
fn jinja_environment_behaves_like_transformers() {
    // trim_blocks + lstrip_blocks, python string methods, raise_exception, tojson, tools = none.
    let template = "{% for m in messages %}\n    {% if m.role == 'system' %}\n{{ m.content.strip() | upper }}|\n    {% elif m.role == 'bad' %}\n{{ raise_exception('bad role ' + m.role) }}\n    {% else %}\n{{ m.content.split(',') | join('+') }}|\n    {% endif %}\n{% endfor %}\n{% if tools is not none %}{{ tools | tojson }}{% endif %}\n{% if add_generation_prompt %}GO{% endif %}\n";
    let dir = folder_with(&[("chat_template.jinja", template)]);
    let tok = Tokenizer::from_folder(&dir).unwrap();
    let msgs = vec![
        json!({"role": "system", "content": "  be nice  "}),
        json!({"role": "user", "content": "a,b,c"}),
    ];
    let out = tok.apply_chat_template(&msgs, true, None).unwrap();
    assert_eq!(out, "BE NICE|\na+b+c|\nGO");
    let tools = json!([{"name": "f", "parameters": {"x": 1.5, "y": "é<>"}}]);
    let out = tok.apply_chat_template(&msgs, false, Some(&tools)).unwrap();
    assert_eq!(
        out,
        "BE NICE|\na+b+c|\n[{\"name\": \"f\", \"parameters\": {\"x\": 1.5, \"y\": \"é<>\"}}]"
    );
    let err = tok
        .apply_chat_template(&[json!({"role": "bad", "content": ""})], false, None)
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("bad role bad"), "{msg}");
    assert!(msg.contains("chat_template.jinja"), "{msg}");
}

#[test]
fn errors_name_the_file() {
    let dir = folder_with(&[("chat_template.jinja", "{% for x in %}")]);
    let msg = format!("{:#}", Tokenizer::from_folder(&dir).unwrap_err());
    assert!(msg.contains("chat_template.jinja"), "{msg}");

    let dir = folder_with(&[("tokenizer_config.json", "{not json")]);
    let msg = format!("{:#}", Tokenizer::from_folder(&dir).unwrap_err());
    assert!(msg.contains("tokenizer_config.json"), "{msg}");

    let empty = std::env::temp_dir().join(format!("tuna-tok-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let msg = format!("{:#}", Tokenizer::from_folder(&empty).unwrap_err());
    assert!(msg.contains("tokenizer.json"), "{msg}");

    let dir = folder_with(&[]);
    let tok = Tokenizer::from_folder(&dir).unwrap();
    let msg = format!(
        "{:#}",
        tok.apply_chat_template(&[], false, None).unwrap_err()
    );
    assert!(msg.contains("no chat template"), "{msg}");
}

#[test]
fn strftime_now_formats_the_current_utc_date() {
    let year: i32 = strftime_now("%Y").unwrap().parse().unwrap();
    assert!((2024..3000).contains(&year), "{year}");
    let day = strftime_now("%-d").unwrap();
    assert!(
        !day.starts_with('0') && (1..=31).contains(&day.parse::<u32>().unwrap()),
        "{day}"
    );
    let long = strftime_now("%d %B %Y").unwrap();
    let parts: Vec<&str> = long.split(' ').collect();
    assert_eq!(parts.len(), 3, "{long}");
    assert_eq!(parts[0].len(), 2, "zero-padded day: {long}");
    assert!(
        [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December"
        ]
        .contains(&parts[1]),
        "{long}"
    );
    assert_eq!(strftime_now("%j").unwrap().len(), 3);
    // An unknown directive is a template error, not a panic.
    assert!(strftime_now("%J").is_err(), "{:?}", strftime_now("%J"));
}

/// A Qwen-style tool-calling template (namespace, reversed slices, `is string`, `tojson`,
/// Python string methods, loop look-around, filters) and its output from Python's jinja2 with
/// transformers' settings (trim_blocks, lstrip_blocks, tojson = json.dumps(ensure_ascii=False)).
/// Object keys are in sorted order: see the report about serde_json's `preserve_order`.
const QWEN_LIKE_TEMPLATE: &str = r####"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
{% for k, v in {"a": [1, 2], "b": 1}.items() %}{{ k }}={{ v | tojson(indent=2) }};{% endfor %}
{{ messages | selectattr("role", "equalto", "user") | map(attribute="content") | join("|") }}
{{ "%s-%d" | format("x", 3) }} {{ messages|length }} {{ "Hello World".lower().title() }} {{ bos_token }}{{ eos_token }}
{% if messages[-1].role != "tool" %}  indented block
{% endif %}
end
"####;
const QWEN_LIKE_MESSAGES: &str = r####"[{"content": "You are a bot.", "role": "system"}, {"content": "What's the weather in Paris?", "role": "user"}, {"content": "<think>\nneed tool\n</think>\n\nLet me check.", "role": "assistant", "tool_calls": [{"function": {"arguments": {"city": "Paris", "unit": "C"}, "name": "get_weather"}, "type": "function"}]}, {"content": "{\"temp\": 21}", "role": "tool"}, {"content": "sunny", "role": "tool"}, {"content": "<think>ok</think>It is 21°C and sunny.", "role": "assistant"}]"####;
const QWEN_LIKE_TOOLS: &str = r####"[{"function": {"description": "Get the weather <now>", "name": "get_weather", "parameters": {"properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"], "type": "string"}}, "required": ["city"], "type": "object"}}, "type": "function"}]"####;
const QWEN_LIKE_GEN_TOOLS: &str = r####"<|im_start|>system
You are a bot.

# Tools

<tools>
{"function": {"description": "Get the weather <now>", "name": "get_weather", "parameters": {"properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"], "type": "string"}}, "required": ["city"], "type": "object"}}, "type": "function"}
</tools><|im_end|>
<|im_start|>user
What's the weather in Paris?<|im_end|>
<|im_start|>assistant
<think>
need tool
</think>

Let me check.
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
{"temp": 21}
</tool_response>
<tool_response>
sunny
</tool_response><|im_end|>
<|im_start|>assistant
<think>
ok
</think>

It is 21°C and sunny.<|im_end|>
<|im_start|>assistant
a=[
  1,
  2
];b=1;What's the weather in Paris?
x-3 6 Hello World <|im_start|><|im_end|>
  indented block
end"####;
const QWEN_LIKE_GEN_NO_TOOLS: &str = r####"<|im_start|>system
You are a bot.<|im_end|>
<|im_start|>user
What's the weather in Paris?<|im_end|>
<|im_start|>assistant
<think>
need tool
</think>

Let me check.
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
{"temp": 21}
</tool_response>
<tool_response>
sunny
</tool_response><|im_end|>
<|im_start|>assistant
<think>
ok
</think>

It is 21°C and sunny.<|im_end|>
<|im_start|>assistant
a=[
  1,
  2
];b=1;What's the weather in Paris?
x-3 6 Hello World <|im_start|><|im_end|>
  indented block
end"####;
const QWEN_LIKE_NO_GEN_TOOLS: &str = r####"<|im_start|>system
You are a bot.

# Tools

<tools>
{"function": {"description": "Get the weather <now>", "name": "get_weather", "parameters": {"properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"], "type": "string"}}, "required": ["city"], "type": "object"}}, "type": "function"}
</tools><|im_end|>
<|im_start|>user
What's the weather in Paris?<|im_end|>
<|im_start|>assistant
<think>
need tool
</think>

Let me check.
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
{"temp": 21}
</tool_response>
<tool_response>
sunny
</tool_response><|im_end|>
<|im_start|>assistant
<think>
ok
</think>

It is 21°C and sunny.<|im_end|>
a=[
  1,
  2
];b=1;What's the weather in Paris?
x-3 6 Hello World <|im_start|><|im_end|>
  indented block
end"####;
const QWEN_LIKE_NO_GEN_NO_TOOLS: &str = r####"<|im_start|>system
You are a bot.<|im_end|>
<|im_start|>user
What's the weather in Paris?<|im_end|>
<|im_start|>assistant
<think>
need tool
</think>

Let me check.
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
{"temp": 21}
</tool_response>
<tool_response>
sunny
</tool_response><|im_end|>
<|im_start|>assistant
<think>
ok
</think>

It is 21°C and sunny.<|im_end|>
a=[
  1,
  2
];b=1;What's the weather in Paris?
x-3 6 Hello World <|im_start|><|im_end|>
  indented block
end"####;

#[test]
fn complex_template_matches_python_jinja2() {
    let dir = folder_with(&[
        ("chat_template.jinja", QWEN_LIKE_TEMPLATE),
        (
            "tokenizer_config.json",
            r#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}"#,
        ),
    ]);
    let tok = Tokenizer::from_folder(&dir).unwrap();
    let msgs: Vec<Value> = serde_json::from_str(QWEN_LIKE_MESSAGES).unwrap();
    let tools: Value = serde_json::from_str(QWEN_LIKE_TOOLS).unwrap();
    let cases = [
        (true, Some(&tools), QWEN_LIKE_GEN_TOOLS),
        (true, None, QWEN_LIKE_GEN_NO_TOOLS),
        (false, Some(&tools), QWEN_LIKE_NO_GEN_TOOLS),
        (false, None, QWEN_LIKE_NO_GEN_NO_TOOLS),
    ];
    for (agp, tools, want) in cases {
        let got = tok
            .apply_chat_template(&msgs, agp, tools)
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            got,
            want,
            "add_generation_prompt={agp} tools={}",
            tools.is_some()
        );
    }
}
