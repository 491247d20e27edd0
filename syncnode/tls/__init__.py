"""Node identity, peer trust and the mutual-TLS contexts every peer connection uses.

Vocabulary
----------
identity
    This node's ECDSA P-256 key and certificate, ``<data_dir>/node.key`` (mode 0600) and
    ``<data_dir>/node.crt``.  The certificate is self-signed, or issued by a cluster CA.  The
    node id (:class:`~syncnode.nodeid.NodeId`) is the SHA-256 of the certificate's DER, so
    replacing the certificate makes the node a different node.
cluster CA
    Optional.  ``create_ca(ca_dir)`` writes ``ca.key``/``ca.crt``; nodes created with it keep a
    copy of ``ca.crt`` in their data dir and then trust every peer whose certificate the CA
    issued directly (the CA has ``pathlen:0``: no intermediates).
pin / trust list
    ``<data_dir>/trust/<node-id-compact>.pem`` holds a trusted peer's exact certificate.  A peer
    is trusted iff its certificate is pinned, or was issued by the node's cluster CA, and it is
    neither on the deny list (``trust/denied/``) nor revoked by the CA's CRL (``crl.pem``).
    The trust store knows only certificates; peer URLs and other metadata belong to the catalog.
successor statement
    A renewed node's old key naming its new certificate; peers adopt it with the certificate
    they already hold for the old id (``trust/successors/``).

One module per noun (import the one you need; this package re-exports nothing):

* :mod:`.errors` - the exceptions, all subclasses of :class:`~.errors.NodeTLSError`;
* :mod:`.certificates` - certificates as bytes: PEM/DER, parsing, building (pure);
* :mod:`.identity` - this node's key and certificate, and the cluster CA, on disk;
* :mod:`.issuance` - signing requests, the CA signing them, revocation lists;
* :mod:`.successor` - successor statements of renewed certificates (pure);
* :mod:`.truststore` - the pinned certificates and the CA certificate a node trusts;
* :mod:`.contexts` - the server and client ``SSLContext`` objects and node-id checks;
* :mod:`.peercert` - learning a peer's certificate from the network before pinning it.

Dependencies point one way: ``errors`` < ``certificates`` < ``identity`` < ``issuance``,
``successor`` < ``truststore`` < ``contexts`` < ``peercert``.
"""
