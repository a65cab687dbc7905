//! The files in deploy/ are used, not just shipped: each is loaded or run here (the Apache snippet, the
//! VS Code gunicorn arguments and the glance-api.conf snippet are used by the end-to-end suite, which
//! runs them against a real Apache and glance).

mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::*;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy(rel)).unwrap()
}

/// JSON with `//` comment lines, as VS Code writes it.
fn jsonc(rel: &str) -> serde_json::Value {
    let text: String = read(rel)
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `key = value` lines of a unit or env file (first value of each key).
fn assignments(text: &str, sep: char) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once(sep))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A copy of DevStack's sample glance-uwsgi.ini whose http-socket is a free port, so the shim can
/// really take it over here. The port stays reserved while the returned guard is held.
fn uwsgi_ini_with_free_port(dir: &Path) -> (PathBuf, u16, Reserved) {
    let reserved = Reserved::new();
    let port = reserved.port;
    let sample = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/glance-uwsgi.ini"),
    )
    .unwrap();
    let path = dir.join("glance-uwsgi.ini");
    std::fs::write(
        &path,
        sample.replace("127.0.0.1:60999", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    (path, port, reserved)
}

#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let unit = read("systemd/devstack@g-shim.service");
    let keys = assignments(&unit, '=');
    let get = |k: &str| {
        keys.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("ExecStart"), Some("/usr/local/bin/glance-shim"));
    assert_eq!(
        get("EnvironmentFile"),
        Some("/etc/glance-shim/glance-shim.env")
    );
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(get(key), Some(want), "{key}");
    }
    let stop: u64 = get("TimeoutStopSec").unwrap().parse().unwrap();
    assert!(
        stop > 10,
        "TimeoutStopSec must outlast the default --drain of 10 s"
    );

    // systemd-analyze verify, on a copy pointing at this build (it checks ExecStart exists). Without
    // the tool the unit is not verified, and a test that skipped it would pass all the same.
    let status = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "systemd-analyze cannot be run ({e}): it verifies the unit. Install Debian's systemd \
                 package: apt-get install --no-install-recommends systemd (.ci/run does this)"
            )
        });
    assert!(status.success(), "systemd-analyze --version: {status}");
    let dir = tempdir("unit");
    let copy = dir.join("devstack@g-shim.service");
    let env = deploy("systemd/glance-shim.env");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/glance-shim",
            env!("CARGO_BIN_EXE_glance-shim"),
        )
        .replace("/etc/glance-shim/glance-shim.env", env.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_env_file_starts_the_takeover_topology() {
    let dir = tempdir("env");
    let (ini, port, _reserved) = uwsgi_ini_with_free_port(&dir);
    let vars = assignments(&read("systemd/glance-shim.env"), '=');
    assert!(
        vars.iter().all(|(k, _)| k.starts_with("GLANCE_SHIM_")),
        "{vars:?}"
    );
    let env: Vec<(String, String)> = vars
        .into_iter()
        .map(|(k, v)| {
            if k == "GLANCE_SHIM_TAKEOVER" {
                (k, ini.to_str().unwrap().to_owned())
            } else {
                (k, v)
            }
        })
        .chain([("GLANCE_SHIM_LOG_FORMAT".to_owned(), "json".to_owned())])
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let shim = Shim::spawn(&[], &env);
    let line = shim.wait_for("listening", |l| msg(l) == "listening").await;
    assert_eq!(field(&line, "listen"), format!("127.0.0.1:{port}"));
    assert_eq!(field(&line, "upstream"), "http://127.0.0.1:9292");
    assert_eq!(field(&line, "takeover"), ini.to_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vscode_task_starts_the_shim_and_its_pattern_sees_it_ready() {
    let tasks = jsonc("vscode/tasks.json");
    let task = &tasks["tasks"][0];
    let launch = jsonc("vscode/launch.json");
    let labels: Vec<&serde_json::Value> = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["label"])
        .collect();
    for config in launch["configurations"].as_array().unwrap() {
        assert!(
            labels.contains(&&config["preLaunchTask"]),
            "{}: {}",
            config["name"],
            config["preLaunchTask"]
        );
    }
    // The other services' tasks take over the service they name, with the same readiness pattern.
    for other in &tasks["tasks"].as_array().unwrap()[1..] {
        let service = other["label"]
            .as_str()
            .unwrap()
            .strip_prefix("glance-shim ")
            .unwrap();
        assert_eq!(other["args"][0], "--takeover");
        assert_eq!(other["args"][1], service);
        assert_eq!(other["problemMatcher"], task["problemMatcher"]);
        let found = launch["configurations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["preLaunchTask"] == other["label"]);
        assert!(found, "no configuration starts {}", other["label"]);
    }
    assert_eq!(task["command"], "glance-shim");
    let dir = tempdir("task");
    let (ini, port, _reserved) = uwsgi_ini_with_free_port(&dir);
    let args: Vec<String> = task["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("/etc/glance/glance-uwsgi.ini", ini.to_str().unwrap())
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let shim = Shim::spawn(&args, &[]);
    // The task's problem matcher waits for this pattern in the shim's (text) output.
    let ends = task["problemMatcher"]["background"]["endsPattern"]
        .as_str()
        .unwrap();
    let line = shim
        .wait_for("the task's endsPattern", |l| {
            l.as_str().is_some_and(|s| s.contains(ends))
        })
        .await;
    assert!(
        line.as_str()
            .unwrap()
            .contains(&format!("listen=127.0.0.1:{port}")),
        "{line}"
    );
}

#[test]
fn the_launch_configurations_match_the_recipe() {
    let launch = jsonc("vscode/launch.json");
    let configs = launch["configurations"].as_array().unwrap();
    let eventlet = configs
        .iter()
        .find(|c| c["name"].as_str().unwrap().contains("<= 32"))
        .unwrap();
    assert!(
        eventlet["program"]
            .as_str()
            .unwrap()
            .ends_with("/glance-api")
    );
    assert_eq!(eventlet["gevent"], true);
    let gunicorn = configs
        .iter()
        .find(|c| c["name"].as_str().unwrap().contains(">= 33"))
        .unwrap();
    assert_eq!(gunicorn["module"], "gunicorn");
    let args: Vec<&str> = gunicorn["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for pair in [
        ["--workers", "1"],
        ["--timeout", "0"],
        ["--bind", "127.0.0.1:9292"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    assert_eq!(args.last(), Some(&"glance.wsgi.api:application"));
}

#[test]
fn every_command_line_in_the_docs_parses() {
    let ini = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/glance-uwsgi.ini");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec![root.join("deploy/README.md"), root.join("README.md")];
    docs.extend(
        std::fs::read_dir(root.join("docs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "md")),
    );
    let mut shown = 0;
    for path in &docs {
        let doc = path.strip_prefix(root).unwrap().display();
        let text = std::fs::read_to_string(path).unwrap();
        let mut seen = 0;
        let mut in_code = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if !in_code {
                continue;
            }
            let line = line
                .trim()
                .trim_start_matches("$ ")
                .trim_start_matches("sudo ");
            let Some(rest) = line.strip_prefix("glance-shim ") else {
                continue;
            };
            // Up to a comment, a redirection or a pipe: what the shell hands the binary.
            let rest = rest.split(['#', '>', '|']).next().unwrap().trim();
            let mut args: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
            // The DevStack paths of --takeover do not exist here: point it at a sample file, of
            // the service it names.
            if let Some(i) = args.iter().position(|a| a == "--takeover") {
                let sample = match args.get(i + 1).map(String::as_str) {
                    Some(value) if !value.starts_with("--") && !value.contains("glance") => {
                        root.join("tests/data/keystone-uwsgi-public.ini")
                    }
                    _ => ini.clone(),
                };
                let sample = sample.to_str().unwrap().to_owned();
                if args.get(i + 1).is_none_or(|a| a.starts_with("--")) {
                    args.insert(i + 1, sample);
                } else {
                    args[i + 1] = sample;
                }
            }
            seen += 1;
            match glance_shim::cli::parse_args_only(
                std::iter::once("glance-shim".to_owned()).chain(args),
            ) {
                glance_shim::cli::Parsed::Run(_)
                | glance_shim::cli::Parsed::Har(_)
                | glance_shim::cli::Parsed::Replay(_) => {}
                other => panic!("{doc}: `{line}` does not parse: {other:?}"),
            }
        }
        if !doc.to_string().starts_with("docs/") {
            assert!(seen >= 2, "{doc} shows at least the two topologies");
        }
        shown += seen;
    }
    assert!(shown >= 6, "{shown} command lines in {docs:?}");
}
