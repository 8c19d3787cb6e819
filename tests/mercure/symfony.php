<?php
// Symfony's Mercure component (Debian's php-symfony-mercure) against ssegate, for
// tests/api/mercure_clients.rs. Two commands, each printing one line:
//
//   php symfony.php cookie <hub public URL> <page URL> <secret> <subscribe selector>...
//       the Set-Cookie header Symfony's Authorization::createCookie() makes for the page
//   php symfony.php publish <hub URL> <secret> <update as JSON>
//       publishes with Symfony's Hub and prints the id the hub answered
//
// Tokens are made by HmacFactory below: Debian ships no JWT library for Symfony's
// LcobucciFactory, and a factory is what the component lets an application plug in.

require_once 'Symfony/Component/Mercure/autoload.php';

use Symfony\Component\HttpFoundation\Request;
use Symfony\Component\Mercure\Authorization;
use Symfony\Component\Mercure\Hub;
use Symfony\Component\Mercure\HubRegistry;
use Symfony\Component\Mercure\Jwt\FactoryTokenProvider;
use Symfony\Component\Mercure\Jwt\TokenFactoryInterface;
use Symfony\Component\Mercure\Update;

/** HS256 tokens with the claims Symfony's own factory writes: mercure.publish/subscribe, exp. */
final class HmacFactory implements TokenFactoryInterface
{
    public function __construct(private string $secret)
    {
    }

    public function create(?array $subscribe = [], ?array $publish = [], array $additionalClaims = []): string
    {
        $mercure = [];
        if (null !== $publish) {
            $mercure['publish'] = $publish;
        }
        if (null !== $subscribe) {
            $mercure['subscribe'] = $subscribe;
        }
        $claims = ['mercure' => $mercure];
        foreach ($additionalClaims as $name => $value) {
            $claims[$name] = $value instanceof \DateTimeInterface ? $value->getTimestamp() : $value;
        }
        $b64 = fn (string $s) => rtrim(strtr(base64_encode($s), '+/', '-_'), '=');
        $unsigned = $b64(json_encode(['alg' => 'HS256', 'typ' => 'JWT'])).'.'.$b64(json_encode($claims));

        return $unsigned.'.'.$b64(hash_hmac('sha256', $unsigned, $this->secret, true));
    }
}

$command = $argv[1] ?? '';
if ('cookie' === $command) {
    [, , $hubUrl, $pageUrl, $secret] = $argv;
    $subscribe = array_slice($argv, 5);
    $factory = new HmacFactory($secret);
    $hub = new Hub($hubUrl, new FactoryTokenProvider($factory, [], ['*']), $factory);
    $authorization = new Authorization(new HubRegistry($hub), 3600);
    $cookie = $authorization->createCookie(Request::create($pageUrl), $subscribe);
    echo $cookie, "\n";
} elseif ('publish' === $command) {
    [, , $hubUrl, $secret, $json] = $argv;
    $u = json_decode($json, true, 512, JSON_THROW_ON_ERROR);
    $factory = new HmacFactory($secret);
    $hub = new Hub($hubUrl, new FactoryTokenProvider($factory, [], ['*']), $factory);
    $update = new Update($u['topics'], $u['data'] ?? '', $u['private'] ?? false, $u['id'] ?? null, $u['type'] ?? null, $u['retry'] ?? null);
    echo $hub->publish($update), "\n";
} else {
    fwrite(STDERR, "usage: symfony.php cookie|publish ...\n");
    exit(2);
}
