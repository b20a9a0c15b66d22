"""netemu.link: the commands a link is built with (pure, no root)."""

from netemu.link import End, Link


def test_node_uplink_commands_name_each_interface_and_join_the_bridge():
    link = Link(near=End("c-fabric", "up"), far=End("c-node-up", "eth0"), mtu=1400, bridge="br0",
                far_address="172.30.0.1/24")
    near, far = link.commands()
    # "name" before every interface name: a node called "up" is not ip's keyword.
    assert near == ["link add name up mtu 1400 type veth peer name eth0 mtu 1400 netns c-node-up",
                    "link set dev up master br0 up"]
    assert far == ["addr add 172.30.0.1/24 dev eth0", "link set dev eth0 up"]


def test_pod_link_commands_set_hairpin_mac_and_gso_before_up():
    link = Link(near=End("c-node-a", "veth1234567"), far=End("c-pod-x", "eth0"), mtu=1472,
                bridge="docker0", hairpin=True, far_mac="02:42:0a:f4:01:02",
                far_address="10.244.1.2/24", far_gso_max_segs=44)
    near, far = link.commands()
    assert near[-1] == "link set dev veth1234567 type bridge_slave hairpin on"
    assert far == ["link set dev eth0 address 02:42:0a:f4:01:02", "addr add 10.244.1.2/24 dev eth0",
                   "link set dev eth0 gso_max_segs 44", "link set dev eth0 up"]
