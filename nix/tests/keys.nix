# Key pairs for the VM tests only. They sign throwaway test payloads inside
# the test VMs and guard nothing; never use them elsewhere.
{
  # nix-store --generate-binary-cache-key ncro-e2e-cacheN secret public
  cache1 = {
    secret = "ncro-e2e-cache1:o/BBds824QhXML7ZLA9/zCF7RG3XnZc3pjryLa1BPl7LpnF5TSD3fqK4Pujle7/e3iNA0btAE835YoV0KBGMVA==";
    public = "ncro-e2e-cache1:y6ZxeU0g936iuD7o5Xu/3t4jQNG7QBPN+WKFdCgRjFQ=";
  };
  cache2 = {
    secret = "ncro-e2e-cache2:GHzJiP0EMRE8wQI6kwHhz6QnrXafDy7OwUt9I9xngSPgRCu1V+1FOdAyvk+1LslWCSLgV/74qTlAWn0QXazaZQ==";
    public = "ncro-e2e-cache2:4EQrtVftRTnQMr5PtS7JVgki4Ff++Kk5QFp9EF2s2mU=";
  };
  # Mesh node identities: the 32-byte ed25519 seed (the key file holds it
  # raw) and the public key, both hex.
  meshA = {
    seed = "f922d1d8bcb79737f9d90fcb77ae6f15c1fe316d37bc9dd694c3fbbce1106cd4";
    public = "da0cfc18462fdd767d1fd1b5d109677814d2c2679a27c1a8c80ad6c809327d75";
  };
  meshB = {
    seed = "e0b91737120c1fe658596c68e48b047ff30d51ab8c03bd8d4d0b087f6420186b";
    public = "1d816afc7a37a280e5a12318ff7f8fe5b95700bc7fe2cec06943b384ffcbab1b";
  };
  # Not a peer of anyone: its announcements must be rejected.
  meshIntruder = {
    seed = "a91c7a340146e37f4d4f1aaea4af173694c2bef6cac9c0f387be26b2c15bdf13";
    public = "21b5668f1d885c66526d6ea0f93f1da271145c10f4ced9942851b439f49fd344";
  };
}
