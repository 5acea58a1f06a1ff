//! The interface the agent serves on, as the kernel sees it now: its index and MTU, read with
//! socket ioctls in the agent's own network namespace (`/sys/class/net` may show another one,
//! e.g. under `nsenter --net`). While the agent runs, [`watch`] follows both: an MTU change
//! resizes the largest reply, and an interface deleted (or deleted and made again, which
//! takes the attached programs with it) ends the agent, so its supervisor starts it afresh.

use std::{sync::Arc, time::Duration};

use tracing::info;

use crate::coherence::Shared;

/// memcached splits UDP replies into datagrams of at most this payload (UDP_MAX_PAYLOAD_SIZE):
/// a bigger reply from the kernel would differ from what memcached sends.
const MEMCACHED_UDP_MAX_PAYLOAD: u32 = 1400;
/// IPv6 header plus UDP header: the larger of the two families' overheads.
const IP_UDP_OVERHEAD: u32 = 40 + 8;
/// How often the interface is looked at. A smaller MTU is noticed this late at most: until
/// then hits whose reply no longer fits are sent and dropped (the client retries).
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// The interface's index in this network namespace; 0 if there is none by that name.
pub fn index(iface: &str) -> u32 {
    let Ok(name) = std::ffi::CString::new(iface) else {
        return 0;
    };
    // SAFETY: NUL-terminated string.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// The interface's MTU in this network namespace.
pub fn mtu(iface: &str) -> Option<u32> {
    // SAFETY: plain socket + SIOCGIFMTU ioctl on a zeroed ifreq with a NUL-terminated name.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return None;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in iface.bytes().take(15).enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFMTU, &mut req);
        libc::close(fd);
        (rc == 0).then_some(req.ifr_ifru.ifru_mtu as u32)
    }
}

/// The largest UDP payload a reply may have on a link of this MTU (whatever the family).
pub fn max_reply_payload(mtu: u32) -> u32 {
    mtu.saturating_sub(IP_UDP_OVERHEAD)
        .min(MEMCACHED_UDP_MAX_PAYLOAD)
}

/// Follows the interface until it is gone or replaced; returns why the agent must stop.
pub async fn watch(shared: Arc<Shared>, iface: String, ifindex: u32) -> String {
    let mut last_mtu = mtu(&iface);
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let now = index(&iface);
        if now != ifindex {
            return if now == 0 {
                format!("interface {iface} was deleted")
            } else {
                format!(
                    "interface {iface} was replaced (index {ifindex}, now {now}): the attached \
                     programs went with the old one"
                )
            };
        }
        let m = mtu(&iface);
        if let Some(new) = m
            && m != last_mtu
        {
            let payload = max_reply_payload(new);
            info!(iface = %iface, mtu = new, max_reply_payload = payload, "interface MTU changed");
            shared.set_max_reply_payload(payload);
            last_mtu = m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_fit_the_link_and_memcacheds_own_limit() {
        assert_eq!(max_reply_payload(1500), 1400);
        assert_eq!(max_reply_payload(600), 552);
        assert_eq!(max_reply_payload(9000), 1400);
        assert_eq!(max_reply_payload(20), 0);
    }

    #[test]
    fn loopback_is_known_and_a_missing_name_is_not() {
        assert_ne!(index("lo"), 0);
        assert!(mtu("lo").is_some());
        assert_eq!(index("no-such-if0"), 0);
        assert_eq!(mtu("no-such-if0"), None);
    }
}
