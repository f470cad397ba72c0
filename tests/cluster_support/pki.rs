//! The run's own certificate authority and certificates, made with the
//! openssl command line (EC P-256 keys: fast to generate).

use std::path::{Path, PathBuf};

use super::procs::run_ok;

pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    ca_key: PathBuf,
    /// Service account token signing key pair.
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

/// A certificate and its key.
#[derive(Clone)]
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("create pki dir");
        let ca_cert = dir.join("ca.crt");
        let ca_key = dir.join("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-days",
            "3",
            "-subj",
            "/CN=kennel-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-keyout",
            path(&ca_key),
            "-out",
            path(&ca_cert),
        ]);
        let sa_key = dir.join("sa.key");
        let sa_pub = dir.join("sa.pub");
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            path(&sa_key),
        ]);
        openssl(&["ec", "-in", path(&sa_key), "-pubout", "-out", path(&sa_pub)]);
        Pki {
            dir: dir.to_owned(),
            ca_cert,
            ca_key,
            sa_key,
            sa_pub,
        }
    }

    /// A certificate signed by the CA for `cn` in group `org`, usable as a
    /// client and (with `sans`) a server certificate.
    pub fn issue(&self, name: &str, cn: &str, org: Option<&str>, sans: &[&str]) -> Cert {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.crt"));
        let ext = self.dir.join(format!("{name}.ext"));
        let subject = match org {
            Some(org) => format!("/O={org}/CN={cn}"),
            None => format!("/CN={cn}"),
        };
        openssl(&[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-subj",
            &subject,
            "-keyout",
            path(&key),
            "-out",
            path(&csr),
        ]);
        let mut extensions = String::from(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        if !sans.is_empty() {
            let names: Vec<String> = sans
                .iter()
                .map(|s| match s.parse::<std::net::IpAddr>() {
                    Ok(_) => format!("IP:{s}"),
                    Err(_) => format!("DNS:{s}"),
                })
                .collect();
            extensions.push_str(&format!("subjectAltName={}\n", names.join(",")));
        }
        std::fs::write(&ext, extensions).expect("write extensions");
        let serial = format!("0x{:x}", rand::random::<u64>());
        openssl(&[
            "x509",
            "-req",
            "-in",
            path(&csr),
            "-CA",
            path(&self.ca_cert),
            "-CAkey",
            path(&self.ca_key),
            "-set_serial",
            &serial,
            "-days",
            "3",
            "-extfile",
            path(&ext),
            "-out",
            path(&cert),
        ]);
        Cert { cert, key }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn openssl(args: &[&str]) {
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(args);
    run_ok(cmd, 30);
}

/// A kubeconfig for `server` authenticating with a client certificate.
pub fn kubeconfig_cert(file: &Path, server: &str, ca: &Path, cert: &Cert) {
    write_kubeconfig(
        file,
        server,
        ca,
        &format!(
            "    client-certificate: {}\n    client-key: {}\n",
            cert.cert.display(),
            cert.key.display()
        ),
    );
}

/// A kubeconfig for `server` authenticating with a bearer token.
pub fn kubeconfig_token(file: &Path, server: &str, ca: &Path, token: &str) {
    write_kubeconfig(file, server, ca, &format!("    token: {token}\n"));
}

fn write_kubeconfig(file: &Path, server: &str, ca: &Path, user: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: test\n  user:\n{user}contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
        ca.display()
    );
    std::fs::write(file, text).expect("write kubeconfig");
}
