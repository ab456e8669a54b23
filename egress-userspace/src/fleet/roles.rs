//! The fleet's etcd users and roles (least privilege), made by `egress fleet init` as `root`.
//! Each user is a certificate's common name; no user has a password.
//!
//! | user                    | may                                                         |
//! |-------------------------|-------------------------------------------------------------|
//! | `egress-publisher`      | write the topology keys; read everything under the prefix   |
//! | `egress-reader`         | read everything under the prefix (`fleet show`, `status`)   |
//! | `egress-agent-<server>` | read the topology and alive keys (its peers' leases); write   |
//! |                         | its own status and alive keys, no other                     |

use etcd_client::{Client, Permission, UserAddOptions};

use super::{Endpoint, Keys, describe, pki};

/// One role and what it may do.
pub struct Role {
    pub name: String,
    pub permissions: Vec<Permission>,
}

/// Every role of a fleet of `servers` (each user has the role of its own name).
pub fn roles(keys: &Keys, servers: &[String]) -> Vec<Role> {
    let mut r = vec![
        Role {
            name: pki::PUBLISHER_USER.into(),
            permissions: vec![
                Permission::read_write(keys.topology()).with_prefix(),
                Permission::read(keys.prefix()).with_prefix(),
            ],
        },
        Role {
            name: pki::READER_USER.into(),
            permissions: vec![Permission::read(keys.prefix()).with_prefix()],
        },
    ];
    r.extend(servers.iter().map(|s| Role {
        name: pki::agent_user(s),
        permissions: vec![
            Permission::read(keys.topology()).with_prefix(),
            // Its next hops' leases (liveness).
            Permission::read(keys.alives()).with_prefix(),
            Permission::read_write(keys.status(s)),
            Permission::read_write(keys.alive(s)),
        ],
    }));
    r
}

/// Whether an error only says that the thing exists already (init is idempotent).
fn exists(e: &etcd_client::Error) -> bool {
    e.to_string().contains("already exists")
}

/// Creates users, roles and grants (what exists is kept), then enables authentication.
/// Returns what it created.
pub async fn ensure(
    client: &mut Client,
    ep: &Endpoint,
    servers: &[String],
) -> anyhow::Result<Vec<String>> {
    let urls = ep.urls.join(",");
    let mut made = Vec::new();
    let user = |client: &mut Client, name: String| {
        let mut client = client.clone();
        let urls = urls.clone();
        async move {
            match client
                .user_add(name.as_str(), "", Some(UserAddOptions::new().with_no_pwd()))
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if exists(&e) => Ok(false),
                Err(e) => Err(describe(e, &urls, None).context(format!("adding user {name}"))),
            }
        }
    };
    if user(client, pki::ROOT_USER.into()).await? {
        made.push("user root".to_string());
    }
    client
        .user_grant_role(pki::ROOT_USER, "root")
        .await
        .map_err(|e| describe(e, &urls, None).context("granting root the root role"))?;
    for role in roles(&ep.keys, servers) {
        match client.role_add(role.name.as_str()).await {
            Ok(_) => made.push(format!("role {}", role.name)),
            Err(e) if exists(&e) => {}
            Err(e) => {
                return Err(describe(e, &urls, None).context(format!("adding role {}", role.name)));
            }
        }
        for p in role.permissions {
            client
                .role_grant_permission(role.name.as_str(), p)
                .await
                .map_err(|e| describe(e, &urls, None).context(format!("granting {}", role.name)))?;
        }
        if user(client, role.name.clone()).await? {
            made.push(format!("user {}", role.name));
        }
        client
            .user_grant_role(role.name.as_str(), role.name.as_str())
            .await
            .map_err(|e| {
                describe(e, &urls, None).context(format!("granting user {0} role {0}", role.name))
            })?;
    }
    client
        .auth_enable()
        .await
        .map_err(|e| describe(e, &urls, None).context("enabling authentication"))?;
    Ok(made)
}
