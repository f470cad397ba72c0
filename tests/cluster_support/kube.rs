//! kubectl against the run's API server: what a person would type, with
//! JSON output for the checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::procs::run_with_input;

#[derive(Clone)]
pub struct Kubectl {
    pub kubeconfig: PathBuf,
    /// The kubectl binary: `kubectl` on PATH unless the cluster brings its own.
    pub program: PathBuf,
}

impl Kubectl {
    pub fn new(kubeconfig: &Path) -> Kubectl {
        Kubectl {
            kubeconfig: kubeconfig.to_owned(),
            program: PathBuf::from("kubectl"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=30s")
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// Run kubectl; the output whatever the exit status.
    pub fn try_run(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        run_with_input(&mut self.command(args), input, 90)
    }

    /// Run kubectl; panic unless it succeeds. Returns stdout.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> String {
        self.run_input(args, None)
    }

    #[track_caller]
    pub fn run_input(&self, args: &[&str], input: Option<&[u8]>) -> String {
        let out = self.try_run(args, input);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl get ... -o json`, or None when it fails (e.g. not found).
    pub fn get(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend(["-o", "json"]);
        let out = self.try_run(&all, None);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The `items` of a list.
    pub fn list(&self, args: &[&str]) -> Vec<Value> {
        self.get(args)
            .and_then(|v| v["items"].as_array().cloned())
            .unwrap_or_default()
    }

    /// `kubectl apply -f -` of one object (JSON).
    #[track_caller]
    pub fn apply(&self, namespace: Option<&str>, object: &Value) -> String {
        let mut args = vec!["apply", "-f", "-"];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        self.run_input(&args, Some(object.to_string().as_bytes()))
    }

    /// `kubectl apply -f FILE`.
    #[track_caller]
    pub fn apply_file(&self, file: &Path) {
        let file = file.to_str().expect("utf-8 path");
        self.run(&["apply", "-f", file]);
    }

    /// `kubectl exec POD -- ARGS` in `namespace`.
    pub fn exec(
        &self,
        namespace: &str,
        pod: &str,
        command: &[&str],
        input: Option<&[u8]>,
    ) -> Output {
        let mut args = vec!["exec", "-n", namespace];
        if input.is_some() {
            args.push("-i");
        }
        args.extend([pod, "--"]);
        args.extend_from_slice(command);
        self.try_run(&args, input)
    }
}

/// Parse every document of a YAML file into JSON values.
pub fn yaml_documents(file: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    yaml_str_documents(&text)
}

/// Parse every document of a YAML text into JSON values.
pub fn yaml_str_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| {
            let value = <Value as serde::Deserialize>::deserialize(doc).expect("valid YAML");
            (!value.is_null()).then_some(value)
        })
        .collect()
}

/// The condition `kind` of an object's status, if present.
pub fn condition<'a>(object: &'a Value, kind: &str) -> Option<&'a str> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str())
}

pub fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}
