//! Who listens on a TCP port of this host (of nanokit's network namespace):
//! the listening sockets of `/proc/net/tcp` and `/proc/net/tcp6`, and the
//! processes whose descriptors hold them (`/proc/<pid>/fd`). Without `/proc`
//! (other systems, which are not supported), nothing is found.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    /// The socket's inode, as `/proc/<pid>/fd/*` links name it (`socket:[N]`).
    pub inode: u64,
}

/// The listening TCP sockets on `port`, IPv4 and IPv6, any address.
pub fn listeners(port: u16) -> Vec<Listener> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| parse_table(&table))
        .filter(|l| l.addr.port() == port)
        .collect()
}

/// The listening sockets of one `/proc/net/tcp{,6}` table.
fn parse_table(table: &str) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&LISTEN) {
                return None;
            }
            Some(Listener {
                addr: parse_addr(f.get(1)?)?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit
/// word of the address in the kernel's (little-endian) byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| w.swap_bytes().to_be_bytes())
        .collect();
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The processes holding socket `inode` (lowest pid first): those whose
/// descriptors this process may read (all of them for root).
pub fn holders(inode: u64) -> Vec<u32> {
    let link = format!("socket:[{inode}]");
    let mut pids: Vec<u32> = super::proc::pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == link.as_str())
                })
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_both_tables_parse() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_addr("00000000:0050"),
            Some("0.0.0.0:80".parse().unwrap())
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:1F90"),
            Some("[::1]:8080".parse().unwrap())
        );
        assert_eq!(parse_addr("zz:1"), None);
    }

    #[test]
    fn a_listener_of_this_process_is_found_with_its_holder() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = listeners(port);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].addr, l.local_addr().unwrap());
        assert_eq!(holders(found[0].inode), vec![std::process::id()]);
        // A connected (not listening) socket is not a listener.
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let theirs = c.local_addr().unwrap().port();
        assert!(listeners(theirs).is_empty());
        drop(l);
        assert!(listeners(port).is_empty());
    }
}
