"""The independent Sparkplug B harness: a recording MQTT proxy (proxy.py, packets.py) and a
``spBv1.0/#`` recorder (recorder.py) around real brokers; checks returning a verdict per spec
assertion id (checks_*.py, verdicts.py) over a recorded session (session.py); assertions.yaml
mapping every id the TCK's seven edge tests reference; the TCK-lite modules (test_<tck test>.py)
judging our edge node's recorded scenario (scenario.py); the harness itself checked on broken
streams (synthetic.py, test_harness.py); and Node peers on Eclipse Tahu's libraries (peer/): a host
for interop (test_interop_host.py) and an edge node as the control (test_control.py)."""
