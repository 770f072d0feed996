//! `portal check` and `portal certs init`: mistakes are caught before
//! serving, and each error says where it is.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use tempfile::TempDir;

/// A config written to `DIR/portal.yaml`; the dir lives as long as the value.
struct ConfigFile {
    _dir: TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(yaml: &str) -> ConfigFile {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.path().join("portal.yaml");
        std::fs::write(&path, yaml).expect("write config");
        ConfigFile { _dir: dir, path }
    }
}

fn portal(args: &[&str], config: Option<&Path>) -> Output {
    let mut command = Command::new(PORTAL);
    command.args(args);
    if let Some(path) = config {
        command.arg("-c").arg(path);
    }
    command.output().expect("run portal")
}

/// Runs `portal check -c FILE`, expecting failure; returns stderr.
fn check_fails(file: &ConfigFile) -> String {
    let out = portal(&["check"], Some(&file.path));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "check should fail; stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The 1-based number of the first line of `yaml` containing `needle`.
fn line_of(yaml: &str, needle: &str) -> usize {
    yaml.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in:\n{yaml}"))
        + 1
}

/// A valid config for two members that need not be running.
fn valid_config(certs: &Certs) -> PortalConfig {
    PortalConfig::new(certs, &[free_port(), free_port()])
}

#[test]
fn the_valid_base_config_passes() {
    let certs = temp_certs();
    let file = ConfigFile::new(&valid_config(&certs).yaml());
    let out = portal(&["check"], Some(&file.path));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn misspelled_key_names_the_file_the_line_and_the_key() {
    let certs = temp_certs();
    let config = valid_config(&certs);
    let b = format!("address: 127.0.0.1:{}", config.members[1].1);
    let yaml = config.yaml().replace(&b, &b.replace("address", "adress"));
    let line = line_of(&yaml, "adress:");

    let file = ConfigFile::new(&yaml);
    let stderr = check_fails(&file);
    assert!(
        stderr.contains(&format!("portal.yaml:{line}:")),
        "expected portal.yaml:{line}: in {stderr}"
    );
    assert!(
        stderr.contains("members[1].adress"),
        "expected the key path in {stderr}"
    );
}

#[test]
fn bad_duration_names_its_line() {
    let certs = temp_certs();
    let yaml = valid_config(&certs)
        .yaml()
        .replace("interval: 200ms", "interval: 1q");
    let line = line_of(&yaml, "interval: 1q");

    let file = ConfigFile::new(&yaml);
    let stderr = check_fails(&file);
    assert!(
        stderr.contains(&format!("portal.yaml:{line}:")),
        "expected portal.yaml:{line}: in {stderr}"
    );
    assert!(stderr.contains("interval"), "{stderr}");
    assert!(stderr.contains("1q"), "{stderr}");
}

#[test]
fn duplicate_listen_address_is_rejected_naming_the_key() {
    let certs = temp_certs();
    let config = valid_config(&certs);
    let rw = format!("listen: 127.0.0.1:{}", config.ports.rw);
    let ro = format!("listen: 127.0.0.1:{}", config.ports.ro);
    let yaml = config.yaml().replace(&ro, &rw);

    let file = ConfigFile::new(&yaml);
    let stderr = check_fails(&file);
    assert!(stderr.contains("portal.yaml:"), "{stderr}");
    assert!(
        stderr.contains("endpoints[") && stderr.contains(".listen"),
        "expected the listen key in {stderr}"
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{}", config.ports.rw)),
        "expected the address in {stderr}"
    );
}

#[test]
fn missing_cert_file_is_rejected_naming_the_file() {
    let certs = temp_certs();
    let missing = certs.dir.join("missing.crt");
    let config = valid_config(&certs).tls_files(&missing, &certs.key);

    let file = ConfigFile::new(&config.yaml());
    let stderr = check_fails(&file);
    assert!(stderr.contains("missing.crt"), "{stderr}");
}

#[test]
fn a_missing_client_ca_names_the_file_the_line_and_the_key() {
    let certs = temp_certs();
    let config = valid_config(&certs);
    let key = format!("          key: {}\n", certs.key.display());
    let missing = certs.dir.join("clients-ca.crt");
    let yaml = config.yaml().replacen(
        &key,
        &format!("{key}          client_ca: {}\n", missing.display()),
        1,
    );
    let line = line_of(&yaml, "client_ca:");
    let stderr = check_fails(&ConfigFile::new(&yaml));
    assert!(
        stderr.contains(&format!("portal.yaml:{line}:")),
        "expected portal.yaml:{line}: in {stderr}"
    );
    assert!(
        stderr.contains("endpoints[0].tls.client_ca"),
        "expected the key in {stderr}"
    );
    assert!(stderr.contains("clients-ca.crt"), "{stderr}");

    // A file that holds no certificate: `check` loads it and says so.
    std::fs::write(&missing, "not PEM\n").expect("write");
    let stderr = check_fails(&ConfigFile::new(&yaml));
    assert!(
        stderr.contains("clients-ca.crt") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
}

#[test]
fn a_bad_proxy_protocol_network_names_its_line_and_key() {
    let certs = temp_certs();
    let yaml = valid_config(&certs)
        .endpoint_key("proxy_protocol:")
        .endpoint_key("  trusted:")
        .endpoint_key("    - 10.0.0.0/8")
        .endpoint_key("    - 10.0.0.1/8")
        .yaml();
    let line = line_of(&yaml, "- 10.0.0.1/8");
    let stderr = check_fails(&ConfigFile::new(&yaml));
    assert!(
        stderr.contains(&format!("portal.yaml:{line}:")),
        "expected portal.yaml:{line}: in {stderr}"
    );
    assert!(
        stderr.contains("endpoints[0].proxy_protocol.trusted[1]"),
        "{stderr}"
    );
    assert!(
        stderr.contains("10.0.0.0/8"),
        "the fix is suggested: {stderr}"
    );

    let empty = valid_config(&certs)
        .endpoint_key("proxy_protocol: {trusted: []}")
        .yaml();
    let stderr = check_fails(&ConfigFile::new(&empty));
    assert!(stderr.contains("proxy_protocol.trusted"), "{stderr}");

    // A valid one passes, and `check` says what it will expect.
    let good = valid_config(&certs)
        .endpoint_key("proxy_protocol: {trusted: [10.0.0.0/8, \"2001:db8::/32\"]}")
        .yaml();
    let file = ConfigFile::new(&good);
    let out = portal(&["check"], Some(&file.path));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("PROXY protocol from 10.0.0.0/8 2001:db8::/32"),
        "{stdout}"
    );
}

#[test]
fn run_refuses_a_bad_config_too() {
    let certs = temp_certs();
    let yaml = valid_config(&certs)
        .yaml()
        .replace("interval: 200ms", "interval: 1q");
    let file = ConfigFile::new(&yaml);
    let stderr_path = file.path.with_extension("stderr");
    let mut child = Command::new(PORTAL)
        .arg("run")
        .arg("-c")
        .arg(&file.path)
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn portal run");
    // If the config were (wrongly) accepted, `run` would serve forever.
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portal run kept running with a bad config");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).expect("read stderr");
    assert!(!status.success(), "run accepted a bad config: {stderr}");
    assert!(stderr.contains("interval"), "{stderr}");
}

#[test]
fn the_example_config_passes_check_once_certs_exist() {
    // The example's relative paths expect `config/` and `certs/` side by side.
    let root = TempDir::new().expect("temp dir");
    let config_dir = root.path().join("config");
    std::fs::create_dir(&config_dir).expect("mkdir config");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
    let copy = config_dir.join("example.yaml");
    std::fs::copy(&example, &copy).expect("copy the example config");
    certs(&root.path().join("certs"));

    let out = portal(&["check"], Some(&copy));
    assert!(
        out.status.success(),
        "the example config should pass check:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("cache-rw") && summary.contains("cache-ro"),
        "the summary should list the endpoints:\n{summary}"
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn certs_init_writes_private_keys_and_refuses_to_overwrite() {
    let root = TempDir::new().expect("temp dir");
    let dir = root.path().join("certs");
    let first = certs(&dir);
    for key in [&first.ca_key, &first.key] {
        assert_eq!(mode(key), 0o600, "{} should be 0600", key.display());
    }
    for cert in [&first.ca, &first.cert] {
        assert!(cert.exists(), "{} missing", cert.display());
    }
    let original = std::fs::read(&first.key).expect("read key");

    let init = |force: bool| {
        let mut args = vec!["certs", "init", "--dir", dir.to_str().expect("utf-8 path")];
        args.extend(["--host", "localhost"]);
        if force {
            args.push("--force");
        }
        portal(&args, None)
    };

    let again = init(false);
    assert!(
        !again.status.success(),
        "certs init overwrote existing files"
    );
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "the refusal should mention --force: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        std::fs::read(&first.key).expect("read key"),
        original,
        "a refused init must leave the key alone"
    );

    let forced = init(true);
    assert!(
        forced.status.success(),
        "certs init --force failed: {}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_ne!(
        std::fs::read(&first.key).expect("read key"),
        original,
        "--force should write a new key"
    );
    for key in [&first.ca_key, &first.key] {
        assert_eq!(mode(key), 0o600, "{} after --force", key.display());
    }
}

#[test]
fn an_https_patroni_api_without_api_tls_names_the_line_and_key() {
    let certs = temp_certs();
    let yaml = format!(
        "clusters:\n  - name: pg\n    protocol: postgres\n    probe:\n      check: patroni\n    \
         members:\n      - name: a\n        address: 127.0.0.1:5432\n        \
         api: https://127.0.0.1:8008\n    endpoints:\n      - name: rw\n        \
         listen: 127.0.0.1:{}\n        route: leader\n        tls: {{cert: {}, key: {}}}\n",
        free_port(),
        certs.cert.display(),
        certs.key.display()
    );
    let line = line_of(&yaml, "api: https://");
    let file = ConfigFile::new(&yaml);
    let stderr = check_fails(&file);
    assert!(
        stderr.contains(&format!("portal.yaml:{line}:")),
        "expected portal.yaml:{line}: in {stderr}"
    );
    assert!(
        stderr.contains("clusters[0].members[0].api") && stderr.contains("probe.api_tls"),
        "{stderr}"
    );

    // With `probe.api_tls` it passes.
    let with_tls = yaml.replace(
        "      check: patroni\n",
        &format!(
            "      check: patroni\n      api_tls: {{ca: {}}}\n",
            certs.ca.display()
        ),
    );
    let file = ConfigFile::new(&with_tls);
    let out = portal(&["check"], Some(&file.path));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_client_key_that_is_not_the_certificates_names_the_line_and_key() {
    let certs = temp_certs();
    let other = temp_certs();
    let config = valid_config(&certs);
    let block = format!(
        "    protocol: redis\n    backend_tls:\n      ca: {}\n      cert: {}\n      key: {}\n",
        certs.ca.display(),
        certs.cert.display(),
        other.key.display()
    );
    let yaml = config.yaml().replacen("    protocol: redis\n", &block, 1);
    let line = line_of(&yaml, "      key: ");
    let file = ConfigFile::new(&yaml);
    let stderr = check_fails(&file);
    assert!(
        stderr.contains(&format!("portal.yaml:{line}:"))
            && stderr.contains("clusters[0].backend_tls.key"),
        "expected portal.yaml:{line}: and the key in {stderr}"
    );
}
