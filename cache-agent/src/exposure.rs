//! Which interfaces memcached can be reached through. The write scanner runs on the served
//! interface and `lo` only: a write that reaches memcached through any other interface is
//! never seen in the kernel (stores are caught late by `watch`; deletes, touches and
//! arithmetic not at all). The agent cannot close that, but it can say so at start.

use std::net::IpAddr;

use crate::coherence::stat;

/// memcached's listen setting (`-l`): `STAT inter` of its `stats settings`, "NULL" when unset.
pub fn listen_setting(settings: &[String]) -> Option<&str> {
    stat(settings, "inter")
}

/// The addresses memcached listens on, from its `inter` setting; None for every address
/// (no `-l`, or a wildcard). Entries that are not literal addresses (host names) are left out.
fn listen_addresses(inter: &str) -> Option<Vec<IpAddr>> {
    let mut addrs = Vec::new();
    for entry in inter.split([',', ' ']).filter(|e| !e.is_empty()) {
        if entry == "NULL" {
            return None;
        }
        let host = if let Some(rest) = entry.strip_prefix('[') {
            rest.split(']').next().unwrap_or(rest)
        } else if entry.matches(':').count() == 1 {
            // a.b.c.d:port
            entry.split(':').next().unwrap_or(entry)
        } else {
            entry
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            if ip.is_unspecified() {
                return None;
            }
            addrs.push(ip);
        }
    }
    Some(addrs)
}

/// One address of one interface in this network namespace.
pub struct InterfaceAddress {
    pub name: String,
    pub ip: IpAddr,
    pub loopback: bool,
}

/// Every address of every interface that is up, in this network namespace (getifaddrs).
pub fn interface_addresses() -> Vec<InterfaceAddress> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed by freeifaddrs below; each entry's
    // name is NUL-terminated and its address, when non-null, is a sockaddr of its family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let ifa = &*p;
            p = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
                continue;
            }
            let ip = match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            };
            out.push(InterfaceAddress {
                name: std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned(),
                ip,
                loopback: ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
            });
        }
        libc::freeifaddrs(head);
    }
    out
}

/// Interfaces other than `served` and the loopback through which memcached, listening as
/// `inter` says, can be reached: writes through them are not seen by the kernel.
pub fn unseen_interfaces(
    inter: &str,
    served: &str,
    interfaces: &[InterfaceAddress],
) -> Vec<String> {
    let listening = listen_addresses(inter);
    let mut names: Vec<String> = interfaces
        .iter()
        .filter(|a| !a.loopback && a.name != served)
        .filter(|a| listening.as_ref().is_none_or(|l| l.contains(&a.ip)))
        .map(|a| a.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(name: &str, ip: &str, loopback: bool) -> InterfaceAddress {
        InterfaceAddress {
            name: name.into(),
            ip: ip.parse().unwrap(),
            loopback,
        }
    }

    #[test]
    fn memcached_on_every_address_is_reachable_through_every_other_interface() {
        let ifs = [
            addr("lo", "127.0.0.1", true),
            addr("eth1", "198.18.0.1", false),
            addr("eth2", "198.18.1.1", false),
            addr("eth2", "2001:2::1", false),
        ];
        assert_eq!(unseen_interfaces("NULL", "eth1", &ifs), ["eth2"]);
        assert_eq!(unseen_interfaces("0.0.0.0", "eth1", &ifs), ["eth2"]);
        assert_eq!(unseen_interfaces("[::]:11211", "eth1", &ifs), ["eth2"]);
    }

    #[test]
    fn memcached_bound_to_the_served_interface_and_lo_is_reachable_nowhere_else() {
        let ifs = [
            addr("lo", "127.0.0.1", true),
            addr("eth1", "198.18.0.1", false),
            addr("eth1", "2001:2::1", false),
            addr("eth2", "198.18.1.1", false),
        ];
        let inter = "198.18.0.1,[2001:2::1],127.0.0.1";
        assert!(unseen_interfaces(inter, "eth1", &ifs).is_empty());
        assert_eq!(
            unseen_interfaces("198.18.0.1:11211 198.18.1.1", "eth1", &ifs),
            ["eth2"]
        );
    }
}
