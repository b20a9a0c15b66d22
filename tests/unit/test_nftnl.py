"""The nf_tables netlink encoder (netemu.proxy.nftnl), no root.

The expected bytes are what nft 1.0.6 sent for the same commands (captured
with strace on kernel 6.18; tests/integration/test_nftnl.py recaptures them
live for a whole table).
"""

import struct

import pytest

from netemu.proxy import nftables as nft
from netemu.proxy import nftnl

# `add ... ip kube-proxy ...` as nft sent them: (message type, flags, body after the 16-byte header)
NFT_SENT = {
    "add set affinity-T { type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }": (
        0xa09, 0x401,
        ("020000000f0001006b7562652d70726f787900000f000200616666696e6974792d5400000800030000000030080004"
         "0000000007080005000000000408000a00000000010c000b000000000000a4cb800a000d000004020000000000")),
    "add chain service-T": (
        0xa03, 0x401, "020000000f0001006b7562652d70726f787900000e000300736572766963652d54000000"),
    "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade": (
        0xa06, 0xc01,
        ("020000000f0001006b7562652d70726f787900000e000200736572766963652d54000000bc010480340001800c0001"
         "007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00"
         "018008000100636d700020000280080001000000000108000200000000000c000380080001000a60000a2400018009"
         "0001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280"
         "080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f616400240002"
         "8008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d70002000"
         "0280080001000000000108000200000000000c0003800600010000500000340001800c0001007061796c6f61640024"
         "00028008000100000000010800020000000001080003000000000c08000400000000022c00018008000100636d7000"
         "20000280080001000000000108000200000000010c000380060001000af40000480001800e000100696d6d65646961"
         "7465000000340002800800010000000000280002802400028008000100fffffffd180002006d61726b2d666f722d6d"
         "61737175657261646500")),
    'ip saddr 10.240.0.0/12 goto service-T comment "short-circuit pod traffic"': (
        0xa06, 0xc01,
        ("020000000f0001006b7562652d70726f787900000e000200736572766963652d54000000e8000480340001800c0001"
         "007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000044400"
         "01800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008"
         "000100fff000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200"
         "000000000c000380080001000af00000400001800e000100696d6d6564696174650000002c00028008000100000000"
         "00200002801c00028008000100fffffffc0e000200736572766963652d5400000020000700001a73686f72742d6369"
         "726375697420706f64207472616666696300")),
    "meta l4proto udp dnat to 10.244.1.11:5353": (
        0xa06, 0xc01,
        ("020000000f0001006b7562652d70726f787900000e000200736572766963652d54000000e400048024000180090001"
         "006d6574610000000014000280080002000000001008000100000000012c00018008000100636d7000200002800800"
         "01000000000108000200000000000c00038005000100110000002c0001800e000100696d6d65646961746500000018"
         "00028008000100000000010c000280080001000af4010b2c0001800e000100696d6d656469617465000000180002"
         "8008000100000000020c0002800600010014e9000038000180080001006e6174002c00028008000100000000010800"
         "020000000002080003000000000108000500000000020800070000000002")),
    # These two carry a set id (dynset, element list) that we leave out: compared as trees.
    "update @affinity-T { ip saddr }": (
        0xa06, 0xc01,
        ("020000000f0001006b7562652d70726f787900000e000200736572766963652d5400000074000480340001800c0001"
         "007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000043c00"
         "01800b00010064796e73657400002c000280080004000000000108000300000000010f000100616666696e6974792d"
         "5400000800020000000001")),
    'add element service-nodeports { tcp . 30080 comment "ns/a:p" : goto service-T }': (
        0xa0c, 0x401,
        ("020000000f0001006b7562652d70726f7879000016000200736572766963652d6e6f6465706f727473000000080004"
         "00000000054800038044000180100001800c0001000600000075800000200002801c00028008000100fffffffc0e00"
         "0200736572766963652d540000000d00060000076e732f613a7000000000")),
}


def messages(batch):
    data = batch.encode()
    out, off = [], 0
    while off < len(data):
        length, mtype, flags, seq = struct.unpack_from("<IHHI", data, off)
        out.append((mtype, flags, seq, data[off + 16:off + length]))
        off += (length + 3) & ~3
    return out


def tree(b):
    """Attributes as nested lists of (type, value)."""
    out, off = [], 0
    while off + 4 <= len(b):
        length, t = struct.unpack_from("<HH", b, off)
        data = b[off + 4:off + length]
        out.append((t, tree(data) if t & nftnl.NLA_F_NESTED else data))
        off += (length + 3) & ~3
    return out


def one(build):
    b = nftnl.Batch()
    build(b)
    msgs = messages(b)
    assert msgs[0][0] == nftnl.NFNL_MSG_BATCH_BEGIN and msgs[-1][0] == nftnl.NFNL_MSG_BATCH_END
    assert [m[2] for m in msgs] == list(range(len(msgs)))      # seq 0 .. n+1
    (mtype, flags, _, body), = msgs[1:-1]
    return mtype, flags, body


@pytest.mark.parametrize("text", [k for k in NFT_SENT if not k.startswith(("add", "update"))])
def test_rules_are_the_bytes_nft_sends(text):
    assert one(lambda b: b.add_rules("service-T", [text])) == \
        (NFT_SENT[text][0], NFT_SENT[text][1], bytes.fromhex(NFT_SENT[text][2]))


def test_set_and_chain_are_the_bytes_nft_sends():
    for key, build in (("add set affinity-T", lambda b: b.add_set("affinity-T", 10800)),
                       ("add chain service-T", lambda b: b.add_chain("service-T"))):
        text = next(k for k in NFT_SENT if k.startswith(key))
        mtype, flags, hexbody = NFT_SENT[text]
        assert one(build) == (mtype, flags, bytes.fromhex(hexbody))


def test_dynset_and_elements_match_nft_but_for_set_ids():
    mtype, flags, body = one(lambda b: b.add_rules("service-T", ["update @affinity-T { ip saddr }"]))
    want = NFT_SENT["update @affinity-T { ip saddr }"]
    assert (mtype, flags) == want[:2]
    theirs = tree(bytes.fromhex(want[2])[4:])
    dynset_data = theirs[2][1][1][1][1][1]        # expressions / 2nd / NFTA_EXPR_DATA / attributes
    dynset_data[:] = [a for a in dynset_data if a[0] != 2]              # NFTA_DYNSET_SET_ID
    assert tree(body[4:]) == theirs
    mtype, flags, body = one(lambda b: b.add_elements(
        nft.SERVICE_NODEPORTS, [("tcp . 30080", ("goto service-T", "ns/a:p"))]))
    want = NFT_SENT['add element service-nodeports { tcp . 30080 comment "ns/a:p" : goto service-T }']
    assert (mtype, flags) == want[:2]
    theirs = [a for a in tree(bytes.fromhex(want[2])[4:]) if a[0] != 4]   # NFTA_SET_ELEM_LIST_SET_ID
    assert tree(body[4:]) == theirs


def test_map_keys_use_4_byte_registers():
    assert nftnl._map_key(nft.SERVICE_IPS, "10.96.0.10 . udp . 53") == \
        bytes([10, 96, 0, 10, 17, 0, 0, 0, 0, 53, 0, 0])
    assert nftnl._map_key(nft.NO_ENDPOINT_NODEPORTS, "tcp . 30080") == bytes([6, 0, 0, 0, 0x75, 0x80, 0, 0])


def test_element_lists_split_below_the_16_bit_attribute_length():
    items = [(f"10.96.{i // 250}.{i % 250 + 1} . tcp . 80",
              (f"goto service-{'X' * 40}-{i}", f"ns/svc-{i}:http")) for i in range(3000)]
    b = nftnl.Batch()
    b.add_elements(nft.SERVICE_IPS, items)
    msgs = messages(b)[1:-1]
    assert len(msgs) > 1
    count = 0
    for _, _, _, body in msgs:
        (_, elems), = [a for a in tree(body[4:]) if a[0] == 3 | nftnl.NLA_F_NESTED]
        assert [t & 0x7fff for t, _ in elems] == list(range(1, len(elems) + 1))   # numbered as libnftnl does
        count += len(elems)
    assert count == 3000


def test_comments_up_to_nft_limit():
    _, udata = nftnl.rule_expressions('goto x comment "' + "c" * 128 + '"')
    assert udata == bytes((0, 129)) + b"c" * 128 + b"\0"


def test_unknown_shapes_are_refused():
    for rule in ("ip daddr 10.0.0.1 accept", "numgen inc mod 2 0 goto x", "meta l4proto icmp dnat to 1.2.3.4:5",
                 "ip saddr 10.244.0.1/16 goto x", "counter", "ip saddr 2001:db8::1 jump x",
                 "ip saddr 010.1.1.1 jump x", "ip saddr 10.1 jump x",
                 'goto x comment "' + "c" * 129 + '"'):
        with pytest.raises(nftnl.Unsupported):
            nftnl.rule_expressions(rule)
    with pytest.raises(nftnl.Unsupported):
        nftnl.Batch().add_elements(nft.SERVICE_IPS, [("10.96.0.1 . tcp . 80", ("continue", "x"))])


def test_a_whole_diff_in_order_and_errors_name_the_message():
    old = nft.NftState(chains={"service-a": ("goto endpoint-a",), "endpoint-a": ("meta l4proto tcp dnat to 10.0.0.1:80",)},
                       sets={"affinity-a": 60})
    old.maps[nft.SERVICE_IPS]["10.96.0.1 . tcp . 80"] = ("goto service-a", "ns/a:p")
    new = nft.NftState(chains={"service-b": ("goto endpoint-b",), "endpoint-b": ("meta l4proto tcp dnat to 10.0.0.2:80",)})
    new.maps[nft.SERVICE_IPS]["10.96.0.2 . tcp . 80"] = ("goto service-b", "ns/b:p")
    b = nftnl.diff_batch(nft.state_diff(old, new))
    kinds = [m[0] for m in messages(b)[1:-1]]
    assert kinds == [nftnl.MSG_DELSETELEM, nftnl.MSG_DELRULE, nftnl.MSG_DELRULE, nftnl.MSG_DELSET,
                     nftnl.MSG_NEWCHAIN, nftnl.MSG_NEWCHAIN, nftnl.MSG_NEWRULE, nftnl.MSG_NEWRULE,
                     nftnl.MSG_NEWSETELEM, nftnl.MSG_DELCHAIN, nftnl.MSG_DELCHAIN]
    assert b.describe(8) == "#8 add rule service-b goto endpoint-b"
    assert b.describe(9) == "#9 add element service-ips (1 elements)"
    assert b.describe(12) == "batch end (commit)"
    assert not nftnl.diff_batch(nft.state_diff(new, new))
