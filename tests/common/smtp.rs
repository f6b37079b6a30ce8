//! A local SMTP sink for the tests: a plain-SMTP server on 127.0.0.1:0 that answers a client
//! (lettre) the way a relay does and keeps each mail it accepts (envelope and message text).
//! It can be told to refuse recipients, or to accept connections and never greet.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One mail the sink accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// The message as sent after DATA (headers and body), dot-stuffing undone.
    pub data: String,
}

impl Mail {
    /// The value of a header of the message.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next()?;
        let prefix = format!("{}: ", name.to_ascii_lowercase());
        head.split("\r\n").find(|l| l.to_ascii_lowercase().starts_with(&prefix)).map(|l| l[prefix.len()..].to_string())
    }

    /// The body of the message, quoted-printable decoded when it says so.
    pub fn body(&self) -> String {
        let body = self.data.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        match self.header("Content-Transfer-Encoding").as_deref() {
            Some("quoted-printable") => unquote(&body),
            _ => body,
        }
    }
}

/// Quoted-printable (RFC 2045) to text: soft line breaks joined, `=XX` bytes decoded.
fn unquote(text: &str) -> String {
    let joined = text.replace("=\r\n", "");
    let (bytes, mut out, mut i) = (joined.as_bytes(), Vec::new(), 0);
    while i < bytes.len() {
        let hex = (bytes[i] == b'=').then(|| joined.get(i + 1..i + 3)).flatten().and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => (out.push(b), i += 3),
            None => (out.push(bytes[i]), i += 1),
        };
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How the sink answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Accept,
    /// `550` to every RCPT TO.
    RefuseRecipients,
    /// Accepts the connection, then says nothing.
    Silent,
}

#[derive(Clone)]
pub struct SmtpSink {
    pub port: u16,
    mails: Arc<Mutex<Vec<Mail>>>,
}

impl SmtpSink {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the SMTP sink");
        let port = listener.local_addr().unwrap().port();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let kept = mails.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let _ = session(stream, behaviour, kept).await;
                });
            }
        });
        Self { port, mails }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }

    /// A `[notify.smtp]` table for this sink (plain SMTP), with `extra` lines.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[notify.smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"hookd <hookd@example.com>\"\n{extra}\n",
            self.port
        )
    }
}

/// The `<...>` of `MAIL FROM:<a@b> BODY=8BITMIME` or `RCPT TO:<a@b>`.
fn address(line: &str) -> String {
    line.split_once('<').and_then(|(_, rest)| rest.split_once('>')).map(|(a, _)| a.to_string()).unwrap_or_default()
}

/// One SMTP session: greeting, EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT.
async fn session(stream: TcpStream, behaviour: Behaviour, mails: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    if behaviour == Behaviour::Silent {
        while lines.next_line().await?.is_some() {}
        return Ok(());
    }
    write.write_all(b"220 sink.test ESMTP ready\r\n").await?;
    let (mut from, mut to) = (String::new(), Vec::new());
    while let Some(line) = lines.next_line().await? {
        let verb = line.split([' ', ':']).next().unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250-sink.test\r\n250 8BITMIME\r\n",
            "MAIL" => {
                from = address(&line);
                b"250 OK\r\n"
            }
            "RCPT" if behaviour == Behaviour::RefuseRecipients => b"550 5.1.1 no such mailbox\r\n",
            "RCPT" => {
                to.push(address(&line));
                b"250 OK\r\n"
            }
            "DATA" => {
                write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut data = String::new();
                while let Some(l) = lines.next_line().await? {
                    if l == "." {
                        break;
                    }
                    data.push_str(l.strip_prefix('.').unwrap_or(&l));
                    data.push_str("\r\n");
                }
                let mail = Mail { from: std::mem::take(&mut from), to: std::mem::take(&mut to), data };
                mails.lock().unwrap().push(mail);
                b"250 OK queued\r\n"
            }
            "RSET" => {
                (from, to) = (String::new(), Vec::new());
                b"250 OK\r\n"
            }
            "NOOP" => b"250 OK\r\n",
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 not implemented\r\n",
        };
        write.write_all(reply).await?;
    }
    Ok(())
}
