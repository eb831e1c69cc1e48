"""The preset dictionary of compact payloads, version 1: frozen text that events are mostly made of.

A zlib stream compressed with a preset dictionary names it by its Adler-32 in the stream header
(RFC 1950, DICTID), so a consumer picks the dictionary from the payload itself. Every byte here
is therefore part of the contract: a change, even of one character, is a new dictionary with a
new id, added beside this one (a consumer must keep decoding what gateways with the old one
send); tests/contract/test_compact.py pins the id.

What is in it only changes how small the payloads get, never what they decode to. Deflate codes
a near match in fewer bits than a far one, so the text that nearly every message repeats comes
last: the meter reading's envelope and its measurements. The rarer types come first.
"""

from __future__ import annotations

import zlib

# Rare: the health, inventory and camera events (their keys), then status, parking and crosswalk.
_RARE = (
    '{"specversion":"1.0","id":"","source":"/gateways//devices/gateway","type":"city.gateway.health",'
    '"time":"20","datacontenttype":"application/json",'
    '"dataschema":"https://edge-agent.example/schemas/v1/city.gateway.health.json","gateway":"",'
    '"device":"gateway","seq":1,"seqepoch":"","data":{"uptime_s":,"site":"","buffer":{"events":0,"bytes":0,'
    '"max_bytes":,"oldest_age_s":null,"by_class":{"alarm":0,"event":0,"telemetry":0,"media":0}},'
    '"accounting":{"accepted":,"delivered":,"buffered":0,"dropped":{"capacity":0,"disk_full":0,'
    '"media_quota":0,"corrupt":0},"not_accepted":0},"dropped_since_last_report":[],'
    '"uplink":{"connected":true,"connects":1,"disconnects":0,"last_error":null},'
    '"devices":{"total":,"online":,"offline":[]},"process":{"cpu_percent":,"rss_bytes":,"threads":},'
    '"host":{"load_avg":[],"cpus":,"mem_total_bytes":,"mem_available_bytes":,"disk_free_bytes":,'
    '"disk_total_bytes":,"temperature_c":},"clock":{"synchronised":true},"version":"","uplinks":{}}}'
    '"type":"city.gateway.inventory","dataschema":"https://edge-agent.example/schemas/v1/city.gateway.inventory.json"'
    '"type":"city.camera.snapshot","dataschema":"https://edge-agent.example/schemas/v1/city.camera.snapshot.json",'
    '"data":{"reason":"interval","trigger":null,"media_type":"image/jpeg","width":,"height":,"image":"/9j/",'
    '"blurred":{"persons":0,"vehicles":0,"faces":0}}}'
    '"type":"city.crosswalk.presence","time":"20","datacontenttype":"application/json",'
    '"dataschema":"https://edge-agent.example/schemas/v1/city.crosswalk.presence.json",'
    '"data":{"area":"","count":0,"max_count":0,"point":""}}'
    '"type":"city.parking.occupancy","time":"20","datacontenttype":"application/json",'
    '"dataschema":"https://edge-agent.example/schemas/v1/city.parking.occupancy.json",'
    '"data":{"bay":"","occupied":false,"confidence":1.0,"since":"20","point":""}}'
    '"type":"city.device.status","time":"20","datacontenttype":"application/json",'
    '"dataschema":"https://edge-agent.example/schemas/v1/city.device.status.json",'
    '"data":{"status":"offline","reason":"timeout","driver":"modbus","consecutive_failures":3,"since":"20'
    '"data":{"status":"online","reason":null,"driver":"virtual","consecutive_failures":0,"since":"20'
    '"recordedtime":"20","partitionkey":"'
)

# Measurements that are not good, and quantities without a phase (named as profiles name them).
_MEASUREMENTS = (
    '{"quantity":"temperature","value":null,"unit":"degC","quality":"bad","point":"","reason":"timeout"},'
    '{"quantity":"active_power","value":,"unit":"kW","quality":"stale","point":"","reason":"timeout"},'
    '{"quantity":"digital_input","value":0,"unit":"","quality":"good","point":"di1"},'
    '{"quantity":"humidity","value":,"unit":"%","quality":"good","point":"humidity"},'
    '{"quantity":"pressure","value":,"unit":"bar","quality":"good","point":"pressure"},'
    '{"quantity":"temperature","value":,"unit":"degC","quality":"good","point":"temperature"},'
    '{"quantity":"counter","value":,"unit":"","quality":"good","point":"counter"},'
    '{"quantity":"flow","value":,"unit":"m3/h","quality":"good","point":"flow"},'
    '{"quantity":"volume","value":,"unit":"m3","quality":"good","point":"volume"},'
    '{"quantity":"reactive_energy","value":,"unit":"kvarh","quality":"good","point":"reactive_energy_export"},'
    '{"quantity":"reactive_energy","value":,"unit":"kvarh","quality":"good","point":"reactive_energy_import"},'
    '{"quantity":"active_energy_export","value":,"unit":"kWh","quality":"good","point":"active_energy_export"},'
    '{"quantity":"active_energy","value":,"unit":"kWh","quality":"good","point":"active_energy_import"},'
    '{"quantity":"frequency","value":50.0,"unit":"Hz","quality":"good","point":"frequency"},'
    '{"quantity":"power_factor","value":,"unit":"","quality":"good","point":"power_factor"},'
    '{"quantity":"reactive_power","value":,"unit":"kvar","quality":"good","point":"reactive_power"},'
    '{"quantity":"apparent_power","value":,"unit":"kVA","quality":"good","point":"apparent_power"},'
    '{"quantity":"active_power","value":,"unit":"kW","quality":"good","point":"active_power"},'
    '{"quantity":"current","value":,"unit":"A","quality":"good","point":"current_avg"},'
    '{"quantity":"voltage","value":230.0,"unit":"V","quality":"good","point":"voltage_ln_avg"},'
    '{"quantity":"voltage","value":400.0,"unit":"V","quality":"good","point":"voltage_l1_l2"},'
)

# Per phase, as a three-phase meter's profile names them.
_PHASES = (
    '{"quantity":"current","value":,"unit":"A","quality":"good","point":"current_n","phase":"N"},'
    '{"quantity":"active_energy","value":,"unit":"kWh","quality":"good","point":"active_energy_import_l1","phase":"L1"},'
    '{"quantity":"power_factor","value":,"unit":"","quality":"good","point":"power_factor_l1","phase":"L1"},'
    '{"quantity":"reactive_power","value":,"unit":"kvar","quality":"good","point":"reactive_power_l1","phase":"L1"},'
    '{"quantity":"apparent_power","value":,"unit":"kVA","quality":"good","point":"apparent_power_l1","phase":"L1"},'
    '{"quantity":"active_power","value":,"unit":"kW","quality":"good","point":"active_power_l1","phase":"L1"},'
    '{"quantity":"active_power","value":,"unit":"kW","quality":"good","point":"active_power_l2","phase":"L2"},'
    '{"quantity":"active_power","value":,"unit":"kW","quality":"good","point":"active_power_l3","phase":"L3"},'
    '{"quantity":"current","value":,"unit":"A","quality":"good","point":"current_l1","phase":"L1"},'
    '{"quantity":"current","value":,"unit":"A","quality":"good","point":"current_l2","phase":"L2"},'
    '{"quantity":"current","value":,"unit":"A","quality":"good","point":"current_l3","phase":"L3"},'
    '{"quantity":"voltage","value":230.0,"unit":"V","quality":"good","point":"voltage_l1","phase":"L1"},'
    '{"quantity":"voltage","value":230.0,"unit":"V","quality":"good","point":"voltage_l2","phase":"L2"},'
    '{"quantity":"voltage","value":230.0,"unit":"V","quality":"good","point":"voltage_l3","phase":"L3"}]}}'
)

# The meter reading's envelope, up to its first measurement: what nearly every message starts with.
_READING = (
    '[{"specversion":"1.0","id":"","source":"/gateways/gw/devices/meter-1","type":"city.meter.reading",'
    '"time":"2026-01-01T00:00:00.000Z","datacontenttype":"application/json",'
    '"dataschema":"https://edge-agent.example/schemas/v1/city.meter.reading.json","gateway":"gw",'
    '"device":"meter-1","seq":1,"seqepoch":"","data":{"measurements":[{"quantity":"'
)

DICTIONARY_V1 = (_RARE + _MEASUREMENTS + _PHASES + _READING).encode("ascii")
DICTIONARY_V1_ID = zlib.adler32(DICTIONARY_V1)

# DICTID -> dictionary: what a decoder accepts. Add new versions here; never remove one.
DICTIONARIES: dict[int, bytes] = {DICTIONARY_V1_ID: DICTIONARY_V1}
