//! Tokenizer and chat-template parity with transformers, using the reference folder
//! (`../shared/reference` next to the crate, or `$TUNA_REFERENCE`).

use std::path::PathBuf;

use serde_json::{Value, json};
use tuna::model::tokenizer::{CivilTime, Tokenizer, civil_from_unix, strftime};

fn reference_dir() -> PathBuf {
    let dir = match std::env::var_os("TUNA_REFERENCE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"),
    };
    assert!(
        dir.join("expected.json").is_file(),
        "reference data not found: looked for {} (set TUNA_REFERENCE to the folder holding expected.json and tiny-llama/)",
        dir.join("expected.json").display()
    );
    dir
}

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
        assert_eq!(tok.decode(&ids, false), decoded, "decoding of {text:?}");
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
    assert_eq!(tok.decode(&ids, true), "user\nHi");
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
fn strftime_formats_utc_dates() {
    // 2024-02-29 13:05:09 UTC was a Thursday, day 60 of the year.
    let t = civil_from_unix(1_709_211_909);
    assert_eq!(
        t,
        CivilTime {
            year: 2024,
            month: 2,
            day: 29,
            hour: 13,
            minute: 5,
            second: 9,
            weekday: 3,
            yday: 60
        }
    );
    assert_eq!(strftime("%d %B %Y", t), "29 February 2024");
    assert_eq!(
        strftime("%a %b %-d %H:%M:%S %p %j %%", t),
        "Thu Feb 29 13:05:09 PM 060 %"
    );
    assert_eq!(strftime("%F", civil_from_unix(0)), "1970-01-01");
}
