//! Which discovered peer a node connects to: the rule that turns the peer table into
//! endpoints. A server's Binary Star partner is the server of the other kind; a client
//! fills one slot per server kind, the primary's first, so that it tries the primary
//! first as it would with configured endpoints.

use super::{Beacon, Kind, Peer};

/// The kind of server a server of kind `own` pairs with; none for a client.
pub fn partner_kind(own: Kind) -> Option<Kind> {
    match own {
        Kind::Primary => Some(Kind::Backup),
        Kind::Backup => Some(Kind::Primary),
        Kind::Client => None,
    }
}

/// The server kinds a client connects to, in the order it tries them (its slots).
pub const CLIENT_SLOTS: [Kind; 2] = [Kind::Primary, Kind::Backup];

impl Beacon {
    /// The live server of `kind` this node uses, if one is up. Two servers of one kind
    /// in a cluster is a misconfiguration ([`Beacon::servers_of_kind`] counts them);
    /// the choice between them is then the lowest instance id, so it is stable while
    /// both live.
    pub fn server_of_kind(&self, kind: Kind) -> Option<&Peer> {
        self.peers().find(|peer| peer.announcement.kind == kind)
    }

    /// How many live servers of `kind` this node hears.
    pub fn servers_of_kind(&self, kind: Kind) -> usize {
        self.peers()
            .filter(|peer| peer.announcement.kind == kind)
            .count()
    }

    /// This server's Binary Star partner, if it is up: the server of the other kind.
    pub fn partner(&self) -> Option<&Peer> {
        partner_kind(self.announcement().kind).and_then(|kind| self.server_of_kind(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beacon::{Announcement, Config, Datagram};
    use crate::kvmsg::BstarState;
    use crate::time::Instant;
    use std::net::{IpAddr, Ipv4Addr};

    fn server(kind: Kind, base_port: u16) -> Announcement {
        Announcement {
            kind,
            state: Some(BstarState::Primary),
            base_port,
            state_port: base_port + 100,
        }
    }

    fn hear(beacon: &mut Beacon, instance: u8, announcement: Announcement) {
        let datagram = Datagram {
            cluster: b"c".to_vec(),
            instance: [instance; 16],
            announcement,
        };
        beacon.handle_datagram(
            Instant::ZERO,
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, instance)),
            &datagram.encode(),
        );
    }

    #[test]
    fn a_backup_pairs_with_the_primary_and_a_client_sees_both_in_slot_order() {
        let mut backup = Beacon::new(
            Instant::ZERO,
            Config::new(b"c", [9; 16], server(Kind::Backup, 5566)),
        )
        .unwrap();
        assert_eq!(backup.partner(), None);
        hear(&mut backup, 2, server(Kind::Backup, 6000));
        assert_eq!(backup.partner(), None, "another backup is not a partner");
        hear(&mut backup, 3, server(Kind::Primary, 5556));
        let partner = backup.partner().unwrap();
        assert_eq!(partner.announcement.base_port, 5556);
        assert_eq!(backup.servers_of_kind(Kind::Backup), 1);
        hear(&mut backup, 6, server(Kind::Backup, 7000));
        let counts =
            [Kind::Primary, Kind::Backup, Kind::Client].map(|kind| backup.servers_of_kind(kind));
        assert_eq!(counts, [1, 2, 0], "a misconfiguration: two other backups");

        let client_announcement = Announcement {
            kind: Kind::Client,
            state: None,
            base_port: 0,
            state_port: 0,
        };
        let mut client = Beacon::new(
            Instant::ZERO,
            Config::new(b"c", [8; 16], client_announcement),
        )
        .unwrap();
        hear(&mut client, 5, server(Kind::Backup, 5566));
        hear(&mut client, 4, server(Kind::Primary, 5556));
        let ports: Vec<Option<u16>> = CLIENT_SLOTS
            .iter()
            .map(|kind| {
                client
                    .server_of_kind(*kind)
                    .map(|p| p.announcement.base_port)
            })
            .collect();
        assert_eq!(ports, [Some(5556), Some(5566)]);
        assert_eq!(client.partner(), None);
    }
}
