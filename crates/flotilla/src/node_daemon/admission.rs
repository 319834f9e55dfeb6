//! Admission into a cluster: `init` creating its PKI, and the join handshake (pin the CA from
//! the token, send a CSR with the token, save what comes back).

use crate::cluster_args::{JoinArgs, NodeArgs};
use crate::node_dir;
use anyhow::{anyhow, Context};
use flotilla_api::cluster::ClusterSecurity;
use flotilla_client::Client;
use flotilla_pki::{
    bootstrap_client_config, fetched_ca_matches, pinned_client_config, CaBundle, JoinSecrets,
    JoinToken, NodeCredentials, NodeIdentity, NodeKey, Role,
};
use flotilla_types::cluster::{JoinRequest, JoinResponse, TokensResponse};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A fresh `init`: the cluster CA and join secrets, this first manager's certificate and
/// raft id 1, all under `DATA_DIR`.
pub(super) fn create_cluster(
    node: &NodeArgs,
    name: &str,
    advertise: SocketAddr,
    cert_validity: Duration,
) -> anyhow::Result<()> {
    let dir = node_dir::pki_dir(&node.data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = CaBundle::generate(name)?;
    let secrets = JoinSecrets::generate();
    let key = NodeKey::generate()?;
    let identity = NodeIdentity {
        node_id: name.to_string(),
        role: Role::Manager,
    };
    let cert_pem = ca.signer.issue(
        &key.csr_pem(name)?,
        &identity,
        &[advertise.ip().to_string()],
        cert_validity,
    )?;
    ClusterSecurity::save(&dir, &ca, &secrets)?;
    NodeCredentials {
        cert_pem,
        key_pem: key.key_pem(),
        trust_pem: ca.trust_pem(),
    }
    .save(&dir)?;
    node_dir::write_raft_id(&node.data_dir, 1)?;
    println!(
        "initialised a new cluster; CA and certificates in {}",
        dir.display()
    );
    Ok(())
}

/// Prints the join commands, tokens included, on a terminal. Anywhere else (a log, a
/// journal) it says where to read them instead: a join token admits a node to the cluster.
pub(super) fn print_join_commands(tokens: &TokensResponse, advertise: SocketAddr) {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        println!(
            "join tokens are not printed to a non-terminal; on this manager, as root (or a \
             member of the flotilla group), run `flotilla token show worker` or \
             `flotilla token show manager` for the join command"
        );
        return;
    }
    println!(
        "to add a worker:  FLOTILLA_JOIN_TOKEN={} flotilla join {advertise}",
        tokens.worker
    );
    println!(
        "to add a manager: FLOTILLA_JOIN_TOKEN={} flotilla join {advertise} --advertise-addr IP:PORT",
        tokens.manager
    );
}

/// The join handshake: pin the CA from the token, send a CSR with the token, save what comes
/// back.
pub(super) async fn obtain_credentials(
    args: &JoinArgs,
    name: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let (text, from) = join_token_text(args)?;
    let token: JoinToken = text.parse().with_context(|| from.to_string())?;
    let bootstrap = Client::with_tls(&args.manager, bootstrap_client_config()?)?;
    let ca = bootstrap
        .cluster_ca()
        .await
        .context("fetching the cluster CA")?;
    fetched_ca_matches(&ca.trust_pem, &token.ca_digest)?;
    let pinned = Client::with_tls(&args.manager, pinned_client_config(&ca.trust_pem)?)?;
    let key = NodeKey::generate()?;
    let advertise = args
        .node
        .advertise_addr
        .or((!args.node.listen_addr.ip().is_unspecified()).then_some(args.node.listen_addr));
    let response = pinned
        .join_cluster(&JoinRequest {
            token: text.clone(),
            node_name: name.to_string(),
            advertise_addr: advertise.map(|a| a.to_string()),
            csr_pem: key.csr_pem(name)?,
        })
        .await
        .context("join refused")?;
    let role = response.role.clone();
    save_admission(&args.node.data_dir, dir, response, &key)?;
    println!("joined as {role} {name}");
    Ok(())
}

/// The join token from `--token-file`, FLOTILLA_JOIN_TOKEN or `--token`, and where it came
/// from (for errors).
fn join_token_text(args: &JoinArgs) -> anyhow::Result<(String, String)> {
    let (text, from) = match (&args.token_file, &args.token) {
        (Some(file), _) => (
            std::fs::read_to_string(file)
                .with_context(|| format!("--token-file {}: cannot read", file.display()))?,
            format!("--token-file {}", file.display()),
        ),
        (None, Some(token)) => (
            token.clone(),
            "--token (or FLOTILLA_JOIN_TOKEN)".to_string(),
        ),
        (None, None) => {
            return Err(anyhow!(
                "this node has not joined yet: give the join token in FLOTILLA_JOIN_TOKEN or \
                 --token-file FILE (`flotilla token show worker|manager` on a manager prints it)"
            ))
        }
    };
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(anyhow!("{from}: the join token is empty"));
    }
    Ok((text, from))
}

/// Saves what a manager answered to a join or a promotion: the certificate for `key`, and for
/// a manager the CA, join secrets and raft id.
pub(super) fn save_admission(
    data_dir: &Path,
    dir: &Path,
    response: JoinResponse,
    key: &NodeKey,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(secrets) = &response.manager_secrets {
        let raft_id = response.raft_id.ok_or_else(|| {
            anyhow!("the manager admitted this node as a manager without a raft id")
        })?;
        let ca = CaBundle::from_pem(
            &secrets.ca_cert_pem,
            &secrets.ca_key_pem,
            &secrets.previous_roots_pem,
        )?;
        ClusterSecurity::save(
            dir,
            &ca,
            &JoinSecrets::from_file_contents(&secrets.join_secrets)?,
        )?;
        node_dir::write_raft_id(data_dir, raft_id)?;
    }
    NodeCredentials {
        cert_pem: response.cert_pem,
        key_pem: key.key_pem(),
        trust_pem: response.trust_pem,
    }
    .save(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn join_args(extra: &[&str]) -> JoinArgs {
        let mut argv = vec!["flotilla", "join", "127.0.0.1:7451"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv)
            .expect("valid arguments")
            .command
        {
            crate::cli::Command::Join(args) => args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn the_join_token_comes_from_a_file_or_the_flag_and_never_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "FLTKN-from-file\n").expect("write");
        let path = file.display().to_string();
        let (token, from) =
            join_token_text(&join_args(&["--token-file", &path])).expect("token from the file");
        assert_eq!(token, "FLTKN-from-file");
        assert!(from.contains("--token-file"));
        let (token, _) = join_token_text(&join_args(&["--token", " FLTKN-x "])).expect("flag");
        assert_eq!(token, "FLTKN-x");

        std::fs::write(&file, "\n").expect("write");
        let empty = join_token_text(&join_args(&["--token-file", &path])).unwrap_err();
        assert!(format!("{empty:#}").contains("empty"), "{empty:#}");
        let missing = dir.path().join("none").display().to_string();
        let unreadable = join_token_text(&join_args(&["--token-file", &missing])).unwrap_err();
        assert!(
            format!("{unreadable:#}").contains("cannot read"),
            "{unreadable:#}"
        );
    }
}
