//! The leaf every subsystem parses its settings with: durations, secret files, URLs, and the
//! one error a setting that cannot be used is ([`SettingError`]: one line naming it). It
//! imports nothing of this crate, so no subsystem depends on `config`, which reads the
//! environment and hands each subsystem its settings.

use std::path::Path;
use std::time::Duration;

/// A setting that is missing or has an unusable value. Displays as one line naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct SettingError {
    /// The environment variable's name.
    pub setting: &'static str,
    /// What is wrong, never quoting a secret.
    pub problem: String,
}

impl SettingError {
    /// A problem with the setting named `setting`.
    pub fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }
}

/// Parses a humantime duration (`500ms`, `20s`, `15m`); a bare number is refused.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("{e} (use a unit, e.g. 500ms, 20s, 15m)"))
}

/// Parses a duration longer than zero.
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        Duration::ZERO => Err("must be longer than zero".to_owned()),
        duration => Ok(duration),
    }
}

/// A secret file that cannot be used: what is wrong with it, naming its path, never its
/// content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SecretFileError(String);

/// Reads a text secret from `path`, dropping one trailing newline; empty is an error.
pub fn read_secret_file(path: &Path) -> Result<String, SecretFileError> {
    String::from_utf8(read_secret_bytes(path)?)
        .map_err(|_| SecretFileError(format!("{} is not UTF-8 text", path.display())))
}

/// Reads a secret of any bytes from `path`, dropping one trailing newline (`\n` or `\r\n`);
/// empty is an error.
pub fn read_secret_bytes(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    let mut secret = std::fs::read(path)
        .map_err(|e| SecretFileError(format!("cannot read {}: {e}", path.display())))?;
    if secret.ends_with(b"\n") {
        secret.pop();
        if secret.ends_with(b"\r") {
            secret.pop();
        }
    }
    if secret.is_empty() {
        return Err(SecretFileError(format!("{} is empty", path.display())));
    }
    Ok(secret)
}

/// Parses a TOML file's `text` into `T`; a problem is one line, naming the line it is on.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|err: toml::de::Error| {
        let line = err
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let message = err.message().replace('\n', " ");
        match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        }
    })
}

/// Reads the text file of `setting` at `path`.
pub fn read_text(setting: &'static str, path: &Path) -> Result<String, SettingError> {
    std::fs::read_to_string(path)
        .map_err(|e| SettingError::new(setting, format!("cannot read {}: {e}", path.display())))
}

/// Checks an endpoint override: an `http://` or `https://` URL with a host.
pub fn check_endpoint_url(url: &str) -> Result<(), String> {
    match url.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {
            Ok(())
        }
        Ok(_) => Err("must be an http:// or https:// URL with a host".to_owned()),
        Err(e) => Err(format!("not a URL: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert!(parse_duration("5").is_err());
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(parse_positive_duration("1s"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn endpoint_url_must_be_http() {
        assert!(check_endpoint_url("http://127.0.0.1:5000").is_ok());
        assert!(check_endpoint_url("https://cognito-idp.eu-west-1.amazonaws.com").is_ok());
        assert!(check_endpoint_url("localhost:5000").is_err());
        assert!(check_endpoint_url("ftp://x").is_err());
    }

    #[test]
    fn secret_files_lose_one_trailing_newline_and_must_hold_something() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\r\n").unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        let empty = read_secret_file(&file).unwrap_err().to_string();
        assert!(empty.ends_with("is empty"), "{empty}");
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        let binary = read_secret_file(&file).unwrap_err().to_string();
        assert!(binary.ends_with("is not UTF-8 text"), "{binary}");
        assert_eq!(read_secret_bytes(&file).unwrap(), [0xff, 0xfe]);
        let missing = read_secret_file(&dir.path().join("none")).unwrap_err();
        assert!(missing.to_string().starts_with("cannot read"), "{missing}");
    }
}
