"""What the HTTP destination kinds (stow, fhir) share below their protocols: the
target a destination's keys describe and its credentials and TLS (target.py), the
transport that connects to exactly the address [egress] checked (transport.py), and
one worker's session with the server: the egress check before every request, one
kept-alive connection, a request whose answer is read with a bound, and the words
for a request that got no answer (session.py).

Knows nothing of STOW-RS or FHIR: a protocol's client builds the request and reads
the answer.
"""
