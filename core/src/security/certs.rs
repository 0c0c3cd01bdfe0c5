//! A development PKI for `strata certs`: one CA, and node or client certificates whose common
//! name is the identity Strata's access control checks.
//!
//! - `init(dir)` writes `ca.pem` and `ca.key` (ECDSA P-256, the key readable by its owner
//!   only); it never overwrites them.
//! - `issue(dir, names)` writes `<name>.pem` and `<name>.key` for each name, signed by that CA:
//!   common name = the name, subject alternative names = the name, `localhost`, `127.0.0.1`
//!   and any `--san`, usable as TLS server and client (mutual TLS between tiers).
//!
//! Production users bring their own PKI: what Strata needs is listed in the README
//! ("Security between tiers").

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use thiserror::Error;

/// The common name of a CA made by [`init`].
pub const CA_COMMON_NAME: &str = "Strata development CA";
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, Error)]
pub enum CertError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0:?} is not a usable identity: use letters, digits, '-', '_' and '.' (it becomes the certificate's common name)")]
    BadName(String),
    #[error("{path} already exists; remove it first to replace it")]
    Exists { path: PathBuf },
    #[error("{0:?} is given twice")]
    DuplicateName(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("--days {0}: a certificate must be valid for 1 to {DAYS_MAX} days")]
    NoDays(u32),
    #[error(
        "{path}: the CA expires in {ca_days} day(s), before these certificates would ({days} days): issue them for at most {ca_days} days, or make a new CA"
    )]
    OutlivesCa { path: PathBuf, days: u32, ca_days: i64 },
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> CertError {
    CertError::File { path: path.to_owned(), reason: e.to_string() }
}

/// Writes `contents` to a new file (never replacing one), readable by the owner only when
/// `private`.
fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(if private { 0o600 } else { 0o644 });
    let mut f = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => CertError::Exists { path: path.to_owned() },
        _ => file_error(path, e),
    })?;
    f.write_all(contents.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| file_error(path, e))
}

/// `(year, month, day)` of `days` after 1970-01-01 (proleptic Gregorian).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// The longest validity asked for, in days (100 years): a certificate's dates must stay
/// within what X.509 and the date library can write (the year 9999).
pub const DAYS_MAX: u32 = 36_500;

/// `days` as asked for (`--days`), or why not.
fn check_days(days: u32) -> Result<(), CertError> {
    if days == 0 || days > DAYS_MAX {
        return Err(CertError::NoDays(days));
    }
    Ok(())
}

/// Days since 1970-01-01 (UTC) today.
fn today() -> i64 {
    (SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) / 86_400) as i64
}

/// Valid from the start of day `from` to the start of day `until` (days since 1970-01-01).
fn validity_between(params: &mut CertificateParams, from: i64, until: i64) {
    let (y, m, d) = civil(from);
    params.not_before = date_time_ymd(y, m, d);
    let (y, m, d) = civil(until);
    params.not_after = date_time_ymd(y, m, d);
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>().map(|b| b & 0x7f)));
}

/// Valid from yesterday (clock skew between machines) to the end of the `days`-th day from
/// today: at least `days` whole days.
fn validity(params: &mut CertificateParams, days: u32) {
    validity_between(params, today() - 1, today() + i64::from(days) + 1);
}

fn ca_params(days: u32) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    params
}

/// Creates `dir` (if needed) and a new CA in it, valid for `days`. Returns the files written.
pub fn init(dir: &Path, days: u32) -> Result<Vec<PathBuf>, CertError> {
    check_days(days)?;
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists { path: p.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let cert = ca_params(days).self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok(vec![cert_path, key_path])
}

/// Whether `name` can be a Strata identity (a node id is always one).
fn usable_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Issues a certificate and key for each of `names` with the CA in `dir`, valid for `days`;
/// `extra_sans` are added to every certificate's subject alternative names (host names or IP
/// addresses the holder is reached at). Returns the files written.
pub fn issue(dir: &Path, names: &[String], extra_sans: &[String], days: u32) -> Result<Vec<PathBuf>, CertError> {
    check_days(days)?;
    issue_between(dir, names, extra_sans, today() - 1, today() + i64::from(days) + 1, days)
}

/// [`issue`], valid from the start of day `from` to the start of day `until` (days since
/// 1970-01-01; `days` is how the caller asked for it).
pub(crate) fn issue_between(dir: &Path, names: &[String], extra_sans: &[String], from: i64, until: i64, days: u32) -> Result<Vec<PathBuf>, CertError> {
    if let Some(bad) = names.iter().find(|n| !usable_name(n)) {
        return Err(CertError::BadName(bad.clone()));
    }
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let key_pem = std::fs::read_to_string(&key_path).map_err(|e| file_error(&key_path, e))?;
    let ca_key = KeyPair::from_pem(&key_pem).map_err(|e| file_error(&key_path, format!("not a private key: {e}")))?;
    // The CA certificate must be ours and belong to that key: a certificate signed with a
    // reconstructed issuer would not chain to it otherwise.
    let ca_pem = std::fs::read(&cert_path).map_err(|e| file_error(&cert_path, e))?;
    let der = rustls_pemfile::certs(&mut ca_pem.as_slice())
        .next()
        .ok_or_else(|| file_error(&cert_path, "no PEM certificate in it"))?
        .map_err(|e| file_error(&cert_path, e))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&der).map_err(|e| file_error(&cert_path, e))?;
    let cn = ca.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("");
    if cn != CA_COMMON_NAME {
        return Err(file_error(
            &cert_path,
            format!("its common name is {cn:?}: not a CA made by `strata certs init` (issue certificates with the PKI that made it)"),
        ));
    }
    if ca.public_key().subject_public_key.data.as_ref() != ca_key.public_key_raw() {
        return Err(file_error(&key_path, format!("is not the key of {}", cert_path.display())));
    }
    // A certificate that outlives its CA stops being accepted when the CA expires, without
    // saying so in its own dates.
    let ca_until_day = ca.validity().not_after.timestamp().div_euclid(86_400);
    if until > ca_until_day {
        return Err(CertError::OutlivesCa { path: cert_path, days, ca_days: (ca_until_day - today() - 1).max(0) });
    }
    let issuer = Issuer::new(ca_params(1), ca_key);

    // Every file checked before any is written: a refusal leaves nothing half done.
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(CertError::DuplicateName(name.clone()));
        }
        for p in [dir.join(format!("{name}.pem")), dir.join(format!("{name}.key"))] {
            if p.exists() {
                return Err(CertError::Exists { path: p });
            }
        }
    }
    let mut written = Vec::new();
    for name in names {
        let (cert_out, key_out) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        let mut sans = vec![name.clone(), "localhost".to_owned(), "127.0.0.1".to_owned()];
        sans.extend(extra_sans.iter().filter(|s| !sans.contains(s)).cloned().collect::<Vec<_>>());
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity_between(&mut params, from, until);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&key_out, &key.serialize_pem(), true)?;
        write_new(&cert_out, &cert.pem(), false)?;
        written.extend([cert_out, key_out]);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(civil(20_782), (2026, 11, 25));
        assert_eq!(civil(-1), (1969, 12, 31));
    }

    #[test]
    fn issued_certificates_name_their_holder_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30).unwrap();
        assert!(matches!(init(dir.path(), 30), Err(CertError::Exists { .. })));
        let written = issue(dir.path(), &["edge-1".into(), "ops".into()], &["gw.example".into()], 30).unwrap();
        assert_eq!(written.len(), 4);
        assert_eq!(super::super::cert_common_name(&dir.path().join("edge-1.pem")).unwrap(), "edge-1");
        assert!(matches!(issue(dir.path(), &["ops".into()], &[], 30), Err(CertError::Exists { .. })));
        assert!(matches!(issue(dir.path(), &["bad name".into()], &[], 30), Err(CertError::BadName(_))));
        // One name refused (exists, or given twice): nothing is written, not even the others.
        for (names, duplicate) in [(vec!["fresh".to_owned(), "ops".into()], false), (vec!["fresh".into(), "fresh".into()], true)] {
            let refused = issue(dir.path(), &names, &[], 30);
            let named = if duplicate {
                matches!(&refused, Err(CertError::DuplicateName(n)) if n == "fresh")
            } else {
                matches!(&refused, Err(CertError::Exists { .. }))
            };
            assert!(named, "{names:?}: {refused:?}");
            assert!(!dir.path().join("fresh.pem").exists() && !dir.path().join("fresh.key").exists(), "{names:?}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("edge-1.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A CA key that does not belong to the CA certificate is refused.
        let other = tempfile::tempdir().unwrap();
        init(other.path(), 30).unwrap();
        std::fs::copy(other.path().join(CA_KEY), dir.path().join(CA_KEY)).unwrap();
        let e = issue(dir.path(), &["x".into()], &[], 30).unwrap_err().to_string();
        assert!(e.contains("is not the key of"), "{e}");
    }

    /// `--days 0` would write a certificate already expired (it ended at today's midnight);
    /// more than `DAYS_MAX` cannot be written; one that would outlive its CA is refused, naming
    /// how long it can be.
    #[test]
    fn validity_is_at_least_a_day_and_within_the_cas() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(init(dir.path(), 0), Err(CertError::NoDays(0))));
        // Past the year 9999 the date cannot be written (it used to panic).
        for days in [DAYS_MAX + 1, 3_000_000, u32::MAX] {
            assert!(matches!(init(dir.path(), days), Err(CertError::NoDays(_))), "{days}");
        }
        init(dir.path(), 30).unwrap();
        assert!(matches!(issue(dir.path(), &["a".into()], &[], 0), Err(CertError::NoDays(0))));
        let e = issue(dir.path(), &["a".into()], &[], 365).unwrap_err().to_string();
        assert!(e.contains("the CA expires in 30 day(s)") && e.contains("at most 30 days"), "{e}");
        issue(dir.path(), &["a".into()], &[], 30).unwrap();
        let pem = std::fs::read(dir.path().join("a.pem")).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(cert.validity().not_after.timestamp() >= now + 30 * 86_400, "at least 30 whole days from now");
    }
}
