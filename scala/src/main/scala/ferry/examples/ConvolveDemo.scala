package ferry.examples

import java.nio.{ByteBuffer, ByteOrder}
import java.nio.charset.StandardCharsets
import java.nio.file.{Files, Paths}

import scala.jdk.CollectionConverters._

import ferry.Convolve
import org.apache.spark.sql.SparkSession

/**
 * Convolves a series stored in Parquet with [[ferry.Convolve]] and writes the result to Parquet.
 *
 * {{{
 * spark-submit --class ferry.examples.ConvolveDemo --jars ferry-assembly.jar ferry-assembly.jar \
 *     <input.parquet> <output.parquet> [<kernel file>] [<mode>] [options]
 *
 *   <kernel file>          .npy (1-D complex or real), .json ({"real": [...], "imag": [...]}) or text
 *                          (one tap per line: "re" or "re im" / "re,im")
 *   --kernel-real a,b,c    the kernel inline instead of a file (with --kernel-imag d,e,f for a complex one)
 *   --mode full|same|valid numpy.convolve mode (default same; also accepted as the 4th positional argument)
 *   --id-col C --real-col C --imag-col C   input columns (defaults id, real, imag; --imag-col "" = real series)
 *   --repeat R             run the job R times in the same session, one result line each (the first
 *                          pays the JVM's warm-up; the later ones show the steady state)
 * }}}
 *
 * Prints one machine-readable line when done:
 * `FERRY_DEMO_RESULT {"path":"scala","seconds":S,"plan_seconds":P,"samples":N,...}` where S covers
 * the whole job (read, convolve, write), P its planning job (`transform`) and N is the number of
 * input samples.
 */
object ConvolveDemo {

  final case class Args(
      input: String = "",
      output: String = "",
      kernelFile: Option[String] = None,
      kernelReal: Option[Array[Double]] = None,
      kernelImag: Option[Array[Double]] = None,
      mode: String = "same",
      idCol: String = "id",
      realCol: String = "real",
      imagCol: String = "imag",
      repeat: Int = 1)

  private val Usage =
    """usage: ConvolveDemo <input.parquet> <output.parquet> [<kernel.npy|.json|.txt>] [<mode>]
      |         [--kernel-real a,b,c [--kernel-imag d,e,f]] [--mode full|same|valid]
      |         [--id-col id] [--real-col real] [--imag-col imag] [--repeat R]""".stripMargin

  def parse(argv: Seq[String]): Args = {
    def list(s: String): Array[Double] = s.split(",").map(_.trim).filter(_.nonEmpty).map(_.toDouble)
    var a = Args()
    val positional = scala.collection.mutable.ArrayBuffer.empty[String]
    var rest = argv.toList
    while (rest.nonEmpty) {
      rest match {
        case "--kernel-real" :: v :: tail => a = a.copy(kernelReal = Some(list(v))); rest = tail
        case "--kernel-imag" :: v :: tail => a = a.copy(kernelImag = Some(list(v))); rest = tail
        case "--kernel" :: v :: tail => a = a.copy(kernelFile = Some(v)); rest = tail
        case "--mode" :: v :: tail => a = a.copy(mode = v); rest = tail
        case "--id-col" :: v :: tail => a = a.copy(idCol = v); rest = tail
        case "--real-col" :: v :: tail => a = a.copy(realCol = v); rest = tail
        case "--imag-col" :: v :: tail => a = a.copy(imagCol = v); rest = tail
        case "--repeat" :: v :: tail if v.forall(_.isDigit) && v.nonEmpty && v.toInt >= 1 =>
          a = a.copy(repeat = v.toInt); rest = tail
        case ("-h" | "--help") :: _ => throw new IllegalArgumentException(Usage)
        case flag :: _ if flag.startsWith("--") =>
          throw new IllegalArgumentException(s"unknown or incomplete option $flag\n$Usage")
        case v :: tail => positional += v; rest = tail
        case Nil =>
      }
    }
    positional.toList match {
      case in :: out :: more =>
        a = a.copy(input = in, output = out)
        more match {
          case Nil =>
          case k :: Nil if Convolve.Modes.contains(k) => a = a.copy(mode = k)
          case k :: Nil => a = a.copy(kernelFile = Some(k))
          case k :: m :: Nil => a = a.copy(kernelFile = Some(k), mode = m)
          case _ => throw new IllegalArgumentException(s"too many arguments: ${more.mkString(" ")}\n$Usage")
        }
      case _ => throw new IllegalArgumentException(s"give the input and output Parquet paths\n$Usage")
    }
    if (a.kernelFile.isEmpty && a.kernelReal.isEmpty) {
      throw new IllegalArgumentException(s"give a kernel file or --kernel-real\n$Usage")
    }
    a
  }

  /** The kernel's (real, imag) parts from a .npy, .json or text file. */
  def readKernel(path: String): (Array[Double], Array[Double]) = {
    val bytes = Files.readAllBytes(Paths.get(path))
    if (path.endsWith(".npy") || (bytes.length > 6 && bytes(0) == 0x93.toByte && new String(bytes, 1, 5,
      StandardCharsets.US_ASCII) == "NUMPY")) readNpy(bytes, path)
    else {
      val text = new String(bytes, StandardCharsets.UTF_8)
      if (text.trim.startsWith("{")) {
        val m = new com.fasterxml.jackson.databind.ObjectMapper().readTree(text)
        def arr(name: String) = Option(m.get(name)).map(_.elements().asScala.map(_.asDouble()).toArray)
        (arr("real").getOrElse(throw new IllegalArgumentException(s"$path has no \"real\" list")),
          arr("imag").getOrElse(Array.empty))
      } else {
        val taps = text.linesIterator.map(_.replaceAll("#.*", "").trim).filter(_.nonEmpty)
          .map(_.split("[,\\s]+").map(_.toDouble)).toArray
        (taps.map(_(0)), if (taps.exists(_.length > 1)) taps.map(t => if (t.length > 1) t(1) else 0.0) else Array.empty)
      }
    }
  }

  /** A 1-D little-endian .npy array of complex128/complex64/float64/float32/int64/int32. */
  def readNpy(bytes: Array[Byte], what: String): (Array[Double], Array[Double]) = {
    val buf = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)
    val major = bytes(6)
    val headerLen = if (major == 1) buf.getShort(8).toInt & 0xffff else buf.getInt(8)
    val start = if (major == 1) 10 else 12
    val header = new String(bytes, start, headerLen, StandardCharsets.ISO_8859_1)
    def field(name: String) = s"'$name'\\s*:\\s*([^,}]+(?:\\([^)]*\\))?)".r.findFirstMatchIn(header).map(_.group(1).trim)
      .getOrElse(throw new IllegalArgumentException(s"$what: .npy header without '$name': $header"))
    val descr = field("descr").replaceAll("'", "")
    val shape = "'shape'\\s*:\\s*\\(([^)]*)\\)".r.findFirstMatchIn(header).map(_.group(1)).getOrElse("")
    val dims = shape.split(",").map(_.trim).filter(_.nonEmpty).map(_.toInt)
    if (dims.length != 1) throw new IllegalArgumentException(s"$what: expected a 1-D array, shape ($shape)")
    val n = dims(0)
    buf.position(start + headerLen)
    val re = new Array[Double](n)
    val im = new Array[Double](n)
    descr match {
      case "<c16" => (0 until n).foreach { i => re(i) = buf.getDouble; im(i) = buf.getDouble }
      case "<c8" => (0 until n).foreach { i => re(i) = buf.getFloat; im(i) = buf.getFloat }
      case "<f8" => (0 until n).foreach(i => re(i) = buf.getDouble)
      case "<f4" => (0 until n).foreach(i => re(i) = buf.getFloat)
      case "<i8" => (0 until n).foreach(i => re(i) = buf.getLong.toDouble)
      case "<i4" => (0 until n).foreach(i => re(i) = buf.getInt.toDouble)
      case other => throw new IllegalArgumentException(s"$what: unsupported dtype $other (use complex128 or float64)")
    }
    (re, if (descr.startsWith("<c")) im else Array.empty)
  }

  /** What one run measured. */
  final case class Result(seconds: Double, planSeconds: Double, samples: Long, outputs: Long, taps: Int, mode: String,
      partitions: Int, run: Int = 1) {
    def line: String =
      f"""FERRY_DEMO_RESULT {"path":"scala","seconds":$seconds%.3f,"plan_seconds":$planSeconds%.3f,""" +
        f""""samples":$samples,""" +
        f""""samples_per_second":${samples / seconds}%.1f,"outputs":$outputs,"taps":$taps,""" +
        s""""mode":"$mode","partitions":$partitions,"run":$run}"""
  }

  /** Reads, convolves and writes; the seconds cover the whole job. */
  def run(spark: SparkSession, args: Args): Result = {
    val (kr, ki) = args.kernelReal match {
      case Some(r) => (r, args.kernelImag.getOrElse(Array.empty[Double]))
      case None => readKernel(args.kernelFile.get)
    }
    val conv = new Convolve().setIdCol(args.idCol).setRealCol(args.realCol).setImagCol(args.imagCol)
      .setKernelReal(kr).setKernelImag(ki).setMode(args.mode)
    val t0 = System.nanoTime()
    val input = spark.read.parquet(args.input)
    val output = conv.transform(input) // the planning job runs here; the compute job in the write
    val planSeconds = (System.nanoTime() - t0) / 1e9
    output.write.mode("overwrite").parquet(args.output)
    val seconds = (System.nanoTime() - t0) / 1e9
    Result(seconds, planSeconds, spark.read.parquet(args.input).count(), spark.read.parquet(args.output).count(), kr.length,
      args.mode, input.rdd.getNumPartitions)
  }

  def main(argv: Array[String]): Unit = {
    val args =
      try parse(argv.toSeq)
      catch {
        case e: IllegalArgumentException =>
          System.err.println(e.getMessage)
          sys.exit(2)
      }
    val spark = SparkSession.builder().appName("ferry ConvolveDemo").getOrCreate()
    try (1 to args.repeat).foreach(i => println(run(spark, args).copy(run = i).line))
    finally spark.stop()
  }
}
